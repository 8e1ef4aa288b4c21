"""`recipe=quickstart` end to end at minimal scale: AR pretraining then the three TiDAR phases, each from the
previous phase's export, with exports, summaries, eval.json and W&B offline runs per phase."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny import env

pytestmark = pytest.mark.e2e

SMALL = ["data.seq_len=64", "data.sources.0.path=json/*", "data.heldout_fraction=0.4", "data.bpe_vocab_size=400",
         "data.bpe_max_bytes=300000", "budget.tokens=2048", "decoder.num_prompts=2", "decoder.prompt_len=8",
         "decoder.max_new_tokens=8", "trainer.log_every=1", "logger.mode=offline", "decoder.quality.passk_prompts=4",
         "decoder.quality.passk_samples=2", "decoder.quality.passk_k=[1,2]", "decoder.quality.target_len=2",
         "decoder.quality.reference_rows=4"]


def assert_greedy_tidar_matches_generate(export, tokenizer):
    """On the exported checkpoint: greedy lossless TiDAR == transformers' generate(do_sample=False)."""
    import torch

    from ar2diff.evaluation.phase_end import load_exported
    from ar2diff.decode.tidar import TidarConfig, decode_tidar

    tidar = load_exported(export)
    prompts = [tokenizer.encode(t) for t in ("import json\ndef load(", "class Decoder(object):\n    def ")]
    ours = decode_tidar(tidar, prompts, TidarConfig(max_new_tokens=12, eos_token_id=tokenizer.eos_token_id))
    hf = AutoModelForCausalLM.from_pretrained(export).eval()
    for prompt, result in zip(prompts, ours):
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert result.token_ids == out[0, len(prompt):].tolist()


def test_quickstart_pipeline(tmp_path):
    run_dir = tmp_path / "qs"
    cmd = [sys.executable, "-m", "ar2diff.train", "recipe=quickstart", *SMALL, f"data.cache_dir={tmp_path / 'c'}",
           f"run_dir={run_dir}"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    assert f"run folder: {run_dir}" in proc.stdout and f"run_dir={run_dir}" in proc.stdout  # the resume command
    assert OmegaConf.load(run_dir / "config.yaml").name == "quickstart"
    assert "recipe=quickstart" in list(OmegaConf.load(run_dir / "overrides.yaml"))
    pipeline = json.loads((run_dir / "pipeline.json").read_text())
    phases = [p["phase"] for p in pipeline["phases"]]
    assert phases == ["ar_pretrain", "tidar_midtrain", "context_extension", "diffusion_sft"]
    previous = None
    for p in pipeline["phases"]:
        export, phase_dir = Path(p["export_dir"]), Path(p["run_dir"])
        meta = json.loads((export / "ar2diff.json").read_text())
        summary = json.loads((phase_dir / "summary.json").read_text())
        assert meta["phase"] == summary["phase"] == p["phase"] and meta["recipe"] == p["phase"]
        assert summary["history"] and summary["tokens_seen"] >= 2048
        assert meta["base_model"] == ("scratch" if previous is None else str(previous))
        assert list((phase_dir / "wandb").glob("offline-run-*")), "one W&B run per phase"
        # the phase folder explains itself: its resolved config (as trained) and the overrides that made it
        resolved = OmegaConf.load(phase_dir / "config.yaml")
        assert resolved.phase == p["phase"] and resolved.data.seq_len == summary["budget"]["seq_len"]
        assert resolved.budget.tokens == summary["budget"]["tokens"]
        assert f"run_dir={run_dir}" not in OmegaConf.load(phase_dir / "overrides.yaml")
        assert f"recipe={p['phase']}" in list(OmegaConf.load(phase_dir / "overrides.yaml"))
        lm = AutoModelForCausalLM.from_pretrained(export)  # loads with no ar2diff code
        if p["phase"] == "ar_pretrain":
            assert meta["mask_token_id"] is None and not (export / "eval.json").exists()
        else:
            tok = AutoTokenizer.from_pretrained(export)
            assert lm.config.mask_token_id == meta["mask_token_id"] == tok.mask_token_id
            ev = json.loads((export / "eval.json").read_text())
            assert set(ev["samplers"]) == {"ar", "lossless", "mixing_0.25", "mixing_0.5"}
            assert ev["samplers"]["lossless"]["agreement_tokens"] == 1.0  # greedy lossless is exact
            assert (export / "acceptance_lossless.png").is_file()
            assert_greedy_tidar_matches_generate(export, tok)
            pre = ev["base_relative"]["pretrain"]  # the fixed pretraining held-out set, start and base as they were
            assert set(pre["scores"]) == {"end", "start", "base"} and pre["scores"]["base"]["loss_diff"] is None
            assert ev["quality_base"] == pipeline["phases"][0]["export_dir"]
            assert ev["passk"]["vs_ar"]["lossless"]["pass@1"]["k"] == 1
            assert ("chat" in ev["base_relative"]) == (p["phase"] == "diffusion_sft")
            assert ("position_loss" in ev) == (p["phase"] == "context_extension")
        previous = export
    quality = json.loads((run_dir / "pipeline_quality.json").read_text())
    assert [r["phase"] for r in quality["rows"]] == ["base", "tidar_midtrain", "context_extension", "diffusion_sft"]
    assert (run_dir / "pipeline_quality.md").is_file() and (run_dir / "pipeline_quality.png").is_file()
    # W&B (offline): every phase's run file carries the pipeline's group and the full resolved config
    for p in pipeline["phases"]:
        (record,) = Path(p["run_dir"]).glob("wandb/offline-run-*/run-*.wandb")
        raw = record.read_bytes()
        assert pipeline["group"].encode() in raw and b'"mask_ratio"' in raw and b'"bpe_vocab_size"' in raw

    # a re-run of the finished pipeline trains, exports and evaluates nothing
    # (the pipeline-level summaries, pipeline.json and pipeline_quality.*, are re-derived from the phases' files)
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")
              if p.is_file() and not p.name.startswith(("pipeline.json", "pipeline_quality"))}
    again = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("is complete (export, summary, eval): not redone") == 4
    assert "[train step" not in again.stdout and "[eval]" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
