"""Base-relative quality, loss by position and the pipeline trajectory: a base -> midtrain -> context-extension chain
of exports, each checkpoint scored as it was on the same rows, numbers equal to direct computations."""

import json
import math

import pytest
import torch

from ar2diff.checkpoint.export_layout import export_model
from ar2diff.config.quality import QualityEvalConfig
from ar2diff.config.schema import DecoderEvalConfig, PhaseConfig
from ar2diff.evaluation.heldout import heldout_losses
from ar2diff.evaluation.phase_end import phase_end_eval
from ar2diff.evaluation.base_relative import load_as_was, original_base, paired_delta
from ar2diff.evaluation.position import bucket_edges, bucket_losses, compare_buckets, token_nll
from ar2diff.evaluation.report import pipeline_trajectory, trajectory_markdown, write_pipeline_quality
from ar2diff.logging import RunLogger
from ar2diff.model import TidarLM
from tiny import EVAL_BLOCK as BLOCK, MASK_ID, Heldout, heldout, mask_word_tokenizer, tiny_model, trained_tidar

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bucket_edges_are_powers_of_two_up_to_seq_len():
    assert bucket_edges(24) == [0, 1, 2, 4, 8, 16, 24]
    assert bucket_edges(16) == [0, 1, 2, 4, 8, 16]


def test_bucket_losses_by_hand_and_beyond_previous_flag():
    nll = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    pos = torch.tensor([1, 2, 3, 5, 9, 12])
    b = bucket_losses(nll, pos, 16)
    assert [(x["start"], x["tokens"], x["loss"]) for x in b] == [
        (0, 0, None), (1, 1, 1.0), (2, 2, 2.5), (4, 1, 4.0), (8, 2, 5.5)]
    better = [dict(x, loss=None if x["loss"] is None else x["loss"] - (x["start"] >= 8)) for x in b]
    cmp = compare_buckets(b, better, previous_seq_len=8)
    assert cmp["beyond_previous_improved"] and cmp["mean_delta_beyond"] == -1.0 and cmp["mean_delta_within"] == 0.0
    assert not compare_buckets(better, b, previous_seq_len=8)["beyond_previous_improved"]


def test_token_nll_averages_to_the_heldout_ar_loss():
    model, rows = trained_tidar("llama"), heldout()
    nll, pos = token_nll(model.model, rows, micro_batch=2)
    assert nll.mean().item() == pytest.approx(heldout_losses(model, rows, 2)["loss_ar"], rel=1e-5)
    assert int(pos.min()) == 1 and int(pos.max()) == 17  # positions 1.. of each document (row 1: 18 tokens)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """base (AR, no mask token) -> start (a TiDAR midtrain export) -> end model (context extension)."""
    root = tmp_path_factory.mktemp("chain")
    tok = mask_word_tokenizer()
    base_dir, start_dir = root / "0_ar_pretrain" / "export", root / "1_tidar_midtrain" / "export"
    export_model(tiny_model("llama", seed=3), tok, base_dir, {"mask_token_id": None, "block_size": 1,
                                                              "phase": "ar_pretrain", "base_model": "scratch"})
    start = TidarLM(tiny_model("llama", seed=4), MASK_ID, BLOCK)
    export_model(start.lm, tok, start_dir, {"mask_token_id": MASK_ID, "block_size": BLOCK,
                                            "phase": "tidar_midtrain", "base_model": str(base_dir)})
    (start_dir / "summary.json").write_text(json.dumps({"budget": {"seq_len": 8}}))
    return {"base": base_dir, "start": start_dir, "tok": tok, "root": root}


def test_original_base_follows_the_export_chain(chain):
    assert original_base(chain["start"]) == chain["base"]
    assert original_base(chain["base"]) == chain["base"]
    assert load_as_was(chain["base"]).kind == "ar" and load_as_was(chain["start"]).model.mask_token_id == MASK_ID


def test_phase_end_eval_reports_base_relative_passk_and_positions(chain, tmp_path):
    end = trained_tidar("llama")
    export_dir, run_dir = tmp_path / "run" / "export", tmp_path / "run"
    export_model(end.lm, chain["tok"], export_dir, {"mask_token_id": MASK_ID, "block_size": BLOCK,
                                                    "phase": "context_extension", "base_model": str(chain["start"])})
    q = QualityEvalConfig(reference_rows=4, passk_prompts=3, passk_samples=3, passk_k=[1, 3], target_len=2)
    cfg = PhaseConfig(name="test", phase="context_extension")
    cfg.model.path = str(chain["start"])
    cfg.data.seq_len = 24
    cfg.decoder = DecoderEvalConfig(num_prompts=3, prompt_len=6, max_new_tokens=6, mix_weights=[0.5], quality=q)
    cfg.trainer.heldout_batches, cfg.deepspeed.micro_batch_size = 2, 2
    rows = heldout()
    logger = RunLogger(run_dir, rank=0, name="x", group=None, config={})
    result = phase_end_eval(cfg=cfg, export_dir=export_dir, run_dir=run_dir, step=3, logger=logger, rank=0,
                            data=type("Data", (), {"heldout": Heldout(rows)})(), tokenizer=chain["tok"])

    pre = result["base_relative"]["pretrain"]
    ref = {k: v[:4] for k, v in rows.items()}
    direct = {name: heldout_losses(load_as_was(chain[name]), ref, 2) for name in ("start", "base")}
    direct["end"] = heldout_losses(end, ref, 2)
    assert pre["scores"]["end"]["loss_ar"] == pytest.approx(direct["end"]["loss_ar"], rel=1e-5)
    assert pre["scores"]["start"]["loss_diff"] == pytest.approx(direct["start"]["loss_diff"], rel=1e-5)
    assert pre["scores"]["base"]["loss_diff"] is None  # the AR base has no mask token
    assert pre["delta_vs_base"]["loss_ar"] == pytest.approx(direct["end"]["loss_ar"] - direct["base"]["loss_ar"],
                                                            rel=1e-5)
    assert pre["delta_vs_start"]["loss_diff"] == pytest.approx(
        direct["end"]["loss_diff"] - direct["start"]["loss_diff"], rel=1e-5)
    assert pre["delta_vs_base"]["loss_ar"] < 0  # trained on progressions vs a random base
    paired = pre["paired_vs_base"]  # per row, paired: the same delta, and an interval that excludes 0 here
    assert paired["loss_ar"] == pytest.approx(pre["delta_vs_base"]["loss_ar"], rel=1e-5)
    assert paired["low"] <= paired["loss_ar"] <= paired["high"] < 0 and paired["confidence"] == 0.95
    assert result["quality_base"] == str(chain["base"])

    pk = result["passk"]
    assert set(pk["samplers"]) == {"ar", "lossless", "mixing_0.5"} and pk["settings"]["temperature"] == 1.0
    assert all(0 <= s["pass@3"]["low"] <= s["pass@3"]["value"] <= s["pass@3"]["high"] <= 1
               for s in pk["samplers"].values())
    assert pk["speed"]["lossless"]["tokens_per_forward"] == result["samplers"]["lossless"]["tokens_per_forward"]

    pl = result["position_loss"]
    assert pl["previous_seq_len"] == 8 and [b["start"] for b in pl["buckets"]] == bucket_edges(24)[:-1]
    assert pl["beyond_previous_improved"]  # trained end vs random start
    on_disk = json.loads((run_dir / "eval.json").read_text())
    assert on_disk["position_loss"] == json.loads(json.dumps(pl))
    assert (run_dir / "speedup_vs_passk.png").is_file() and (run_dir / "position_loss.png").is_file()
    logged = logger.history[-1]
    assert logged["eval/base_relative/pretrain/delta_vs_base/loss_ar"] == pytest.approx(
        pre["delta_vs_base"]["loss_ar"])
    assert "eval/passk/lossless/pass@3_high" in logged and "eval/position_loss/16-24/delta" in logged

    traj = write_pipeline_quality(tmp_path / "run_root", [run_dir])
    assert [r["phase"] for r in traj["rows"]] == ["base", "context_extension"]
    assert traj["rows"][1]["delta_ar"] == pytest.approx(pre["delta_vs_base"]["loss_ar"])
    md = (tmp_path / "run_root" / "pipeline_quality.md").read_text()
    assert md.count("\n") == 4 and "| context_extension |" in md
    assert (tmp_path / "run_root" / "pipeline_quality.png").is_file()


def test_trajectory_orders_base_then_phases_and_keeps_the_chat_set():
    def ev(phase, end_ar, base_ar=3.0, chat=False):
        scores = {"end": {"loss_ar": end_ar, "loss_diff": end_ar + 1}, "base": {"loss_ar": base_ar, "loss_diff": None}}
        br = {"pretrain": {"scores": scores, "delta_vs_start": {"loss_ar": -0.1}}}
        if chat:
            br["chat"] = {"scores": scores}
        return {"phase": phase, "export_dir": phase, "base_relative": br, "quality_base": "b"}

    traj = pipeline_trajectory([ev("tidar_midtrain", 2.5), ev("context_extension", 2.4),
                                ev("diffusion_sft", 2.6, chat=True)])
    assert [r["phase"] for r in traj["rows"]] == ["base", "tidar_midtrain", "context_extension", "diffusion_sft"]
    assert [round(r["delta_ar"], 6) for r in traj["rows"]] == [0.0, -0.5, -0.6, -0.4]
    assert "chat" in traj["rows"][3] and math.isclose(traj["rows"][3]["chat"]["end"]["loss_ar"], 2.6)
    assert "| diffusion_sft | 2.600 | 3.600 | -0.400 | -0.100 |" in trajectory_markdown(traj)


def test_paired_delta_resamples_rows_for_both_models_at_once():
    import numpy as np

    tokens = np.array([10, 20, 30, 40])
    other = np.array([25.0, 40.0, 90.0, 100.0])
    same_shift = paired_delta((other - tokens * 0.5, tokens), (other, tokens))  # every row 0.5 nats/token better
    assert same_shift["loss_ar"] == pytest.approx(-0.5)
    assert same_shift["low"] == pytest.approx(-0.5) and same_shift["high"] == pytest.approx(-0.5)  # paired: no noise
    mixed = paired_delta((other + np.array([5.0, -10.0, 3.0, -2.0]), tokens), (other, tokens))
    assert mixed["loss_ar"] == pytest.approx(-4.0 / 100)
    assert mixed["low"] < mixed["loss_ar"] < mixed["high"]
