"""The phase-end decoder check: held-out losses equal a direct TidarLM computation, prompts are cut as documented,
greedy lossless agrees exactly with AR, histograms account for every forward, eval.json/PNGs are written, and the
trainer callback on an export folder gives the same numbers."""

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from ar2diff.checkpoint.export_layout import export_model
from ar2diff.config.quality import QualityEvalConfig
from ar2diff.config.schema import DecoderEvalConfig, PhaseConfig
from ar2diff.decode.projection import ACCELERATORS
from ar2diff.evaluation.decoder_check import evaluate_checkpoint
from ar2diff.evaluation.heldout import read_heldout, select_prompts
from ar2diff.evaluation.eval_json import write_eval
from ar2diff.evaluation.phase_end import phase_end_eval
from ar2diff.logging import RunLogger
from tiny import EVAL_BLOCK, EVAL_SEQ, MASK_ID, Heldout, heldout, mask_word_tokenizer, trained_tidar

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = EVAL_BLOCK
S = EVAL_SEQ
DCFG = DecoderEvalConfig(num_prompts=3, prompt_len=6, max_new_tokens=10, mix_weights=[0.5], seed=0,
                         quality=QualityEvalConfig(enabled=False))  # tests/test_phase_quality.py covers quality


@lru_cache(maxsize=None)
def evaluated(arch: str) -> dict:
    return evaluate_checkpoint(trained_tidar(arch), heldout(), DCFG, eos_id=None, heldout_batches=2, micro_batch=2)


def test_select_prompts_round_robin_skips_short_and_padding():
    rows = heldout()
    assert select_prompts(rows, 3, 6) == [(0, 0), (1, 4), (2, 0)]  # row 1's 4-token first document is skipped
    assert select_prompts(rows, 8, 6) == [(0, 0), (1, 4), (2, 0), (3, 0), (4, 0), (5, 0), (0, 16), (2, 16)]
    assert select_prompts(rows, 1, 17) == [(1, 4)]
    with pytest.raises(ValueError, match=r"1 document segments of >= decoder.prompt_len=17 .*decoder.num_prompts=2"):
        select_prompts(rows, 2, 17)


def test_read_heldout_reads_more_rows_until_prompts_are_found():
    class Split:
        def __init__(self, rows):
            self.data, self.reads = rows, []

        def __len__(self):
            return len(self.data["input_ids"])

        def rows(self, idx):
            idx = list(idx)
            self.reads.append(len(idx))
            return {k: v[idx] for k, v in self.data.items()}

    split = Split(heldout(6))
    assert read_heldout(split, loss_rows=1, num_prompts=1, prompt_len=6)["input_ids"].shape[0] == 1
    split.reads.clear()
    rows = read_heldout(split, loss_rows=1, num_prompts=1, prompt_len=17)  # only row 1 has a 17-token segment
    assert split.reads == [1, 2] and rows["input_ids"].shape[0] == 2
    with pytest.raises(ValueError, match="held-out split is empty"):
        read_heldout(Split({k: v[:0] for k, v in heldout().items()}), 4, 1, 6)


@pytest.mark.parametrize("arch", ["llama", "zaya"])
def test_heldout_losses_equal_a_direct_tidar_forward(arch):
    result, model = evaluated(arch), trained_tidar(arch)
    rows = {k: v[:4] for k, v in heldout().items()}  # heldout_batches * micro_batch rows
    with torch.no_grad():
        terms = model(rows["input_ids"], rows["doc_ids"], rows["position_ids"], rows["loss_mask"]).terms
    h = result["heldout"]
    assert (h["rows"], h["batches"], h["tokens"]) == (4, 2, 4 * S)
    assert (h["tokens_ar"], h["tokens_diff"]) == (terms.n_ar, terms.n_diff) == (4 * 20, 4 * 22)
    assert h["loss_ar"] == pytest.approx(float(terms.ar), rel=1e-5)
    assert h["loss_diff"] == pytest.approx(float(terms.diff), rel=1e-5)
    assert h["loss"] == pytest.approx((float(terms.ar) + float(terms.diff)) / 2, rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "zaya"])
def test_decoding_metrics(arch):
    result = evaluated(arch)
    assert set(result) == {"settings", "heldout", "prompts", "samplers", "quality", "router_load", "statistics",
                           "agreement_curve", "levels_auto"}
    if arch == "zaya":  # the load of the routers' biased choices on the held-out rows, per layer
        assert set(result["router_load"]) == {"layer0", "layer1"}
        assert {"max_load", "min_load", "load_ratio", "load_entropy", "skip_share"} <= set(
            result["router_load"]["layer0"])
    else:
        assert result["router_load"] == {}
    assert set(result["levels_auto"]) == {"lossless", "mixing_0.5"}
    for r in result["levels_auto"]["lossless"].values():  # mi300x, mi355x, h100
        assert r["chosen"]["speedup"] >= max(r["all"]["speedup"], r["zyphra"]["speedup"]) - 1e-12
    greedy = result["statistics"]["temperature_0"]["samplers"]
    for name, s in result["samplers"].items():
        assert greedy[name]["tpf"]["tokens_per_forward"] == pytest.approx(s["tokens_per_forward"])
        assert greedy[name]["tpf"]["low"] <= s["tokens_per_forward"] <= greedy[name]["tpf"]["high"]
    assert result["agreement_curve"]["block_size"] == BLOCK and sum(result["agreement_curve"]["positions"]) > 0
    assert result["prompts"]["picks"] == [[0, 0], [1, 4], [2, 0]]
    s = result["samplers"]
    assert list(s) == ["ar", "lossless", "mixing_0.5"]
    for name, entry in s.items():
        assert sum(entry["acceptance_histogram"]) == entry["forwards"], name
        assert entry["tokens"] == DCFG.num_prompts * DCFG.max_new_tokens  # no EOS: every prompt runs to the end
        assert entry["tokens_per_forward"] == entry["tokens"] / entry["forwards"]
        assert entry["speedup_wall"] == pytest.approx(entry["tokens_per_s"] / s["ar"]["tokens_per_s"])
    assert s["ar"]["acceptance_histogram"] == [s["ar"]["forwards"]] and s["ar"]["speedup_wall"] == 1.0
    assert s["lossless"]["agreement_tokens"] == s["lossless"]["agreement_prompts"] == 1.0  # greedy lossless is exact
    assert sum(s["lossless"]["acceptance_histogram"][1:]) > 0  # drafts were accepted, not only rejected
    assert s["lossless"]["forwards"] < s["ar"]["forwards"]
    assert (s["mixing_0.5"]["kind"], s["mixing_0.5"]["mix_weight"]) == ("mixing", 0.5)
    assert "projection" not in s["ar"]
    for name in ("lossless", "mixing_0.5"):
        proj = s[name]["projection"]
        assert set(proj) == set(ACCELERATORS)
        assert proj["MI300X"]["tokens_per_forward"] == pytest.approx(
            sum(i * c for i, c in enumerate(s[name]["acceptance_histogram"])) / s[name]["forwards"] + 1)
    q = result["quality"]
    assert q["temperature"] == 1.0 and set(q["nll_per_token"]) == set(s)
    assert all(v > 0 for v in q["nll_per_token"].values())
    assert q["nll_excess_over_ar"]["mixing_0.5"] == pytest.approx(q["nll_per_token"]["mixing_0.5"]
                                                                 - q["nll_per_token"]["ar"])
    again = evaluate_checkpoint(trained_tidar(arch), heldout(), DCFG, None, 2, 2)
    assert evaluated(arch)["samplers"]["lossless"]["acceptance_histogram"] == again["samplers"]["lossless"][
        "acceptance_histogram"]  # deterministic


class RecordingLogger:
    def __init__(self):
        self.logged, self.images, self.summary = [], [], {}

    def log(self, step, metrics, prefix="train"):
        self.logged.append((step, prefix, metrics))

    def log_image(self, key, path, step):
        self.images.append((key, Path(path), step))

    def update_summary(self, values):
        self.summary.update(values)

    def print(self, *args):
        pass


def test_write_eval_writes_json_pngs_and_logs(tmp_path):
    result = evaluated("llama")
    logger = RecordingLogger()
    paths = write_eval(result, [tmp_path / "export", tmp_path], logger, step=7)
    assert paths == [tmp_path / "export" / "eval.json", tmp_path / "eval.json"]
    for folder in (tmp_path / "export", tmp_path):
        assert json.loads((folder / "eval.json").read_text()) == json.loads(json.dumps(result))
        assert sorted(p.name for p in folder.iterdir() if p.is_file()) == [
            "acceptance_lossless.png", "acceptance_mixing_0.5.png", "agreement_curve.png", "eval.json",
            "tokens_per_forward_ci.png"]  # no temporary files left
        assert (folder / "acceptance_lossless.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (step, prefix, metrics), = logger.logged
    assert (step, prefix) == (7, "eval")
    assert metrics["heldout/loss_ar"] == result["heldout"]["loss_ar"]
    assert metrics["mixing_0.5/tokens_per_forward"] == result["samplers"]["mixing_0.5"]["tokens_per_forward"]
    assert metrics["lossless/projected_speedup/MI300X"] == result["samplers"]["lossless"]["projection"]["MI300X"][
        "speedup"]
    assert all(isinstance(v, float) for v in metrics.values())
    assert [(k, p.name, s) for k, p, s in logger.images] == [
        ("eval/acceptance/lossless", "acceptance_lossless.png", 7),
        ("eval/acceptance/mixing_0.5", "acceptance_mixing_0.5.png", 7),
        ("eval/tokens_per_forward_ci", "tokens_per_forward_ci.png", 7), ("eval/agreement_curve", "agreement_curve.png", 7)]
    assert metrics["temperature_0/lossless/tpf"] == result["statistics"]["temperature_0"]["samplers"]["lossless"][
        "tpf"]["tokens_per_forward"]
    assert metrics["agreement_curve/argmax_agree"] == result["agreement_curve"]["mean_over_drafts"]["argmax_agree"]
    assert logger.summary["eval"]["tokens_per_forward"] == {
        k: v["tokens_per_forward"] for k, v in result["samplers"].items()}


def test_write_eval_plots_the_router_load_of_a_moe(tmp_path):
    result = evaluated("zaya")
    logger = RecordingLogger()
    write_eval(result, [tmp_path], logger, step=3)
    assert (tmp_path / "router_load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ("eval/router_load", tmp_path / "router_load.png", 3) in logger.images
    (_, _, metrics), = logger.logged
    assert metrics["router/layer1/max_load"] == result["router_load"]["layer1"]["max_load"]
    assert metrics["router/max_load"] == max(m["max_load"] for m in result["router_load"].values())


def test_phase_end_eval_on_an_export_folder(tmp_path):
    model, tokenizer = trained_tidar("zaya"), mask_word_tokenizer()
    export_dir, run_dir = tmp_path / "run" / "export", tmp_path / "run"
    export_model(model.lm, tokenizer, export_dir, {"mask_token_id": MASK_ID, "block_size": BLOCK,
                                                   "phase": "tidar_midtrain", "recipe": "test"})
    cfg = PhaseConfig(name="test", phase="tidar_midtrain")
    cfg.decoder = DCFG
    cfg.trainer.heldout_batches, cfg.deepspeed.micro_batch_size = 2, 2
    data = type("Data", (), {"heldout": Heldout(heldout())})()
    kwargs = dict(cfg=cfg, export_dir=export_dir, run_dir=run_dir, step=5, data=data, tokenizer=tokenizer)

    other = RunLogger(run_dir, rank=1, name="x", group=None, config={})
    assert phase_end_eval(logger=other, rank=1, **kwargs) is None
    assert not (run_dir / "eval.json").exists() and not (export_dir / "eval.json").exists()

    logger = RunLogger(run_dir, rank=0, name="x", group=None, config={})
    result = phase_end_eval(logger=logger, rank=0, **kwargs)
    on_disk = [json.loads((d / "eval.json").read_text()) for d in (export_dir, run_dir)]
    assert on_disk[0] == on_disk[1] == json.loads(json.dumps(result))
    assert (result["step"], result["phase"], result["recipe"]) == (5, "tidar_midtrain", "test")
    assert result["settings"]["eos_token_id"] == 2  # the export's generation config
    assert (export_dir / "acceptance_lossless.png").is_file() and (run_dir / "acceptance_mixing_0.5.png").is_file()
    assert logger.history[-1]["step"] == 5 and "eval/lossless/tokens_per_forward" in logger.history[-1]
    assert logger.summary["eval"]["loss_ar"] == result["heldout"]["loss_ar"]

    direct = evaluate_checkpoint(model, heldout(), DCFG, 2, 2, 2)  # the in-memory model, same settings and EOS
    assert result["heldout"] == pytest.approx(direct["heldout"], rel=1e-5)
    for name, s in direct["samplers"].items():
        for key in ("acceptance_histogram", "forwards", "tokens", "agreement_tokens"):
            assert result["samplers"][name][key] == s[key], (name, key)
    assert result["quality"]["nll_per_token"] == pytest.approx(direct["quality"]["nll_per_token"], rel=1e-5)
    assert result["statistics"] == direct["statistics"]  # decoding a fixed checkpoint is deterministic
