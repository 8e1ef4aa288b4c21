"""scripts/device_check.py in its small CPU form, as a bare accelerator node would run it: DeepSpeed, Hydra, OmegaConf,
`datasets` and W&B made unimportable, the script run by path. Every section must produce its rows; the attention
forms must agree (split SDPA and flex against dense SDPA, fp32 and bf16)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
BARE = ("import runpy, sys\n"
        "for name in ('deepspeed', 'hydra', 'omegaconf', 'datasets', 'wandb'):\n"
        "    sys.modules[name] = None  # importing it raises ImportError, as on a node without it\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("device-check") / "device_check.json"
    proc = subprocess.run([sys.executable, "-c", BARE, str(ROOT / "scripts" / "device_check.py"), "--small",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=out.parent, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[decoder_step]" in proc.stdout  # the tables are printed
    return json.loads(out.read_text())


def test_every_section_runs_without_deepspeed_hydra_or_datasets(report):
    assert report["small"] is True
    assert list(report["sections"]) == ["parity", "block_mask", "train_step", "memory_plan", "decoder_step"]
    for name, section in report["sections"].items():
        assert section["error"] is None and section["rows"], name


def test_the_attention_forms_agree(report):
    rows = report["sections"]["parity"]["rows"]
    checked = [r for r in rows if "ok" in r]
    assert {(r["arch"], r["dtype"], r["form"]) for r in checked} == {
        (a, d, f) for a in ("llama", "qwen3_moe", "zaya") for d in ("fp32", "bf16") for f in ("split_sdpa", "flex")}
    assert all(r["ok"] for r in checked), [r for r in checked if not r["ok"]]
    fp32 = [r for r in checked if r["dtype"] == "fp32"]
    assert max(max(r["logits_err"], r["loss_rel"], r["grad_rel"] or 0) for r in fp32) < 1e-5


def test_the_other_sections_report_numbers(report):
    s = report["sections"]
    assert [r["layout_len"] for r in s["block_mask"]["rows"]] == [8192, 16384]
    assert {(r["arch"], r["seq_len"]) for r in s["train_step"]["rows"]} == {("zaya", 256), ("qwen3_moe", 256)}
    assert all(r["tidar_s"] > 0 and r["ar_s"] > 0 for r in s["train_step"]["rows"])
    assert len(s["memory_plan"]["rows"]) == 3
    assert all(r["planned_mib"] > 0 and math.isfinite(r["plan_over_measured"]) for r in s["memory_plan"]["rows"])


def test_the_projection_uses_the_cpu_histogram(report):
    sys.path.insert(0, str(ROOT / "scripts"))
    from device_check import REFERENCE_HISTOGRAM

    from ar2diff.decode.projection import tokens_per_forward

    (row,) = report["sections"]["decoder_step"]["rows"]
    assert row["tpf_cpu_histogram"] == pytest.approx(tokens_per_forward(REFERENCE_HISTOGRAM))
    assert row["projected_speedup"] == pytest.approx(row["tpf_cpu_histogram"] / row["step_ratio"])
    assert row["tidar_tokens_in"] > 8  # drafts + the next token + mask templates of block 8
