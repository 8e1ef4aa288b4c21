"""`recipe=reference_smollm2` (docs/reference-run.md) on a tiny stand-in for SmolLM2: a Llama with the stdlib BPE,
a few steps per phase. Both phases run from the given base, each writes an intermediate export with its light
check and a phase-end panel with the out-of-domain set, and a re-run redoes nothing."""

import json
import subprocess
import sys

import pytest

from tiny import TINY_CONFIGS, env

from ar2diff.data import DataConfig, SourceConfig, get_tokenizer
from ar2diff.model import build_model

pytestmark = pytest.mark.e2e

SMALL = ["data.sources.0.path=json/*", "data.seq_len=64", "data.heldout_fraction=0.4", "budget.tokens=2048",
         "trainer.ckpt_every=2", "trainer.export_every=2", "decoder.num_prompts=2", "decoder.light_prompts=2",
         "decoder.prompt_len=8", "decoder.max_new_tokens=8", "decoder.quality.passk_prompts=2",
         "decoder.quality.passk_samples=2", "decoder.quality.passk_k=[1,2]", "decoder.quality.target_len=2",
         "decoder.quality.reference_rows=3", "logger=none"]


def test_reference_recipe_smoke(tmp_path):
    cache, base, run_dir = tmp_path / "cache", tmp_path / "base", tmp_path / "run"
    tok = get_tokenizer(DataConfig(sources=[SourceConfig(path="json/*")], bpe_vocab_size=400,
                                   bpe_max_bytes=300_000, cache_dir=str(cache)))
    build_model(dict(TINY_CONFIGS["llama"], vocab_size=len(tok)), seed=0).save_pretrained(base)
    tok.save_pretrained(base)
    cmd = [sys.executable, "-m", "ar2diff.train", "recipe=reference_smollm2", f"model.path={base}", *SMALL,
           f"data.cache_dir={cache}", f"run_dir={run_dir}"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    phases = json.loads((run_dir / "pipeline.json").read_text())["phases"]
    assert [p["phase"] for p in phases] == ["tidar_midtrain", "diffusion_sft"]  # no context extension
    for p in phases:
        phase_dir = run_dir / p["run_dir"].split("/")[-1]
        summary = json.loads((phase_dir / "summary.json").read_text())
        assert summary["status"] == "complete" and summary["steps"] == 4
        # the recipe's engine: bf16 weights and DeepSpeed bf16 (fp32 master weights)
        resolved = json.loads((phase_dir / "resolved_config.json").read_text())
        assert resolved["model"]["dtype"] == "bfloat16" and resolved["deepspeed"]["precision"] == "bf16"
        # one intermediate export (step 2 of 4; the last step's export is the phase's own) with its light check
        assert sorted(x.name for x in (phase_dir / "exports").iterdir()) == ["step_000002"]
        light = json.loads((phase_dir / "exports" / "step_000002" / "light_eval.json").read_text())
        assert light["step"] == 2 and light["tokens_seen"] == 2 * 8 * 64 and light["greedy"]["prompts"] == 2
        tpf = light["greedy"]["tokens_per_forward"]
        assert 1.0 <= tpf["low"] <= tpf["tokens_per_forward"] <= tpf["high"] <= 8
        assert light["greedy"]["levels"] == [1, 2] and len(light["agreement_by_offset"]["argmax_agree"]) == 8
        # the phase-end panel: levels 1,2, and the base-relative losses on the out-of-domain prose, paired
        ev = json.loads((phase_dir / "eval.json").read_text())
        ood = ev["base_relative"]["out_of_domain"]
        assert ood["rows"] == 3 and set(ood["scores"]) >= {"end", "base"}
        paired = ood["paired_vs_base"]
        assert paired["low"] <= paired["loss_ar"] <= paired["high"]
        assert paired["loss_ar"] == pytest.approx(ood["delta_vs_base"]["loss_ar"], abs=1e-2)  # per row vs batched, bf16
        assert ev["samplers"]["lossless"]["tokens_per_forward"] >= 1.0
    assert proc.stdout.count("[light step 2]") == 2 and "CPU bf16:" in proc.stdout

    again = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("is complete (export, summary, eval): not redone") == 2
