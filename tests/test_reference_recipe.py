"""`recipe=reference_smollm2` (docs/reference-run.md) on a tiny stand-in for SmolLM2: a Llama with the stdlib BPE,
a few steps per phase. Both phases run from the given base, each writes an intermediate export with its light
check and a phase-end panel with the out-of-domain set, and a re-run redoes nothing. A stop signal during the first
phase's decoder check stops the pipeline; the re-run does the check, then the second phase, as if never stopped."""

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tiny import TINY_CONFIGS, env, losses

from ar2diff.data import DataConfig, SourceConfig, get_tokenizer
from ar2diff.model import build_model

pytestmark = pytest.mark.e2e
SCRIPTS = Path(__file__).parents[1] / "scripts"

SMALL = ["data.sources.0.path=json/*", "data.seq_len=64", "data.heldout_fraction=0.4", "budget.tokens=2048",
         "trainer.ckpt_every=2", "trainer.export_every=2", "decoder.num_prompts=2", "decoder.light_prompts=2",
         "decoder.prompt_len=8", "decoder.max_new_tokens=8", "decoder.quality.passk_prompts=2",
         "decoder.quality.passk_samples=2", "decoder.quality.passk_k=[1,2]", "decoder.quality.target_len=2",
         "decoder.quality.reference_rows=3", "logger=none"]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """(base folder, data cache): a tiny Llama with the stdlib BPE, saved like a fetched model."""
    root = tmp_path_factory.mktemp("stand_in")
    cache, base = root / "cache", root / "base"
    tok = get_tokenizer(DataConfig(sources=[SourceConfig(path="json/*")], bpe_vocab_size=400,
                                   bpe_max_bytes=300_000, cache_dir=str(cache)))
    build_model(dict(TINY_CONFIGS["llama"], vocab_size=len(tok)), seed=0).save_pretrained(base)
    tok.save_pretrained(base)
    return base, cache


def reference_cmd(stand_in, run_dir) -> list[str]:
    base, cache = stand_in
    return [sys.executable, "-m", "ar2diff.train", "recipe=reference_smollm2", f"model.path={base}", *SMALL,
            f"data.cache_dir={cache}", f"run_dir={run_dir}"]


@pytest.fixture(scope="module")
def uninterrupted(stand_in, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference_run")
    proc = subprocess.run(reference_cmd(stand_in, run_dir), env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return run_dir, proc


def test_reference_recipe_smoke(stand_in, uninterrupted):
    run_dir, proc = uninterrupted
    cmd = reference_cmd(stand_in, run_dir)
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

    # docs/reference-run.md's tables and plot: one curve row per light check and phase end, tokens across phases
    report = subprocess.run([sys.executable, str(SCRIPTS / "reference_report.py"), str(run_dir)], env=env(),
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-3000:]
    rows = [line for line in report.stdout.splitlines() if line.startswith("| 0_") or line.startswith("| 1_")]
    assert [r.split(" | ")[2] for r in rows] == ["1,024", "2,048", "3,072", "4,096"]
    assert report.stdout.count("| out_of_domain | 3 |") == 2 and (run_dir / "reference_curve.png").is_file()


def run_until(cmd, pattern: str, sig: int, delay: float = 0.5, timeout: float = 600):
    """Start `cmd`; `delay` s after a stdout line contains `pattern`, send `sig`; (exit status, stdout, stderr)."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, seen = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if pattern in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert seen.wait(timeout), "".join(lines)[-3000:]
    time.sleep(delay)
    proc.send_signal(sig)
    err = proc.stderr.read()
    proc.wait(timeout=timeout)
    reader.join(timeout=10)
    return proc.returncode, "".join(lines), err


def test_sigterm_during_the_decoder_check_stops_the_pipeline_and_the_rerun_finishes_it(stand_in, uninterrupted,
                                                                                       tmp_path):
    code, out, err = run_until(reference_cmd(stand_in, tmp_path), "[eval] phase-end decoder check on",
                               signal.SIGTERM)
    assert code == 0, err[-3000:]
    assert "SIGTERM during the decoder check: abandoned" in out
    first = tmp_path / "0_tidar_midtrain"
    assert json.loads((first / "summary.json").read_text())["status"] == "stopped"
    assert not (first / "eval.json").exists() and (first / "export" / "model.safetensors").is_file()
    assert not (tmp_path / "1_diffusion_sft").exists()  # the next phase never started
    export_mtime = (first / "export" / "model.safetensors").stat().st_mtime

    proc = subprocess.run(reference_cmd(stand_in, tmp_path), env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (first / "eval.json").is_file() and (first / "export" / "model.safetensors").stat().st_mtime == export_mtime
    assert json.loads((first / "summary.json").read_text())["status"] == "complete"
    reference = uninterrupted[0]
    assert losses(first) == losses(reference / "0_tidar_midtrain")
    # the later phase starts from the same export file; in this bf16 recipe on CPU one fresh-clone run saw its first
    # logged loss differ from the uninterrupted run's by 6e-6 relative (two earlier runs: equal), so the comparison
    # allows 1e-4: a wrong start (another export, data position or optimizer state) moves the loss far more
    again, want = losses(tmp_path / "1_diffusion_sft"), losses(reference / "1_diffusion_sft")
    assert [row[0] for row in again] == [row[0] for row in want] and again
    torch.testing.assert_close(torch.tensor([row[1:] for row in again]), torch.tensor([row[1:] for row in want]),
                               rtol=1e-4, atol=0)
