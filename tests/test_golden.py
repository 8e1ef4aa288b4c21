"""Golden loss curve: the first logged losses of a fixed-seed tiny TiDAR run, stored in tests/golden/.

A change that moves these numbers (loss, layout, mask sampling, data order, optimizer, schedule) fails here and has
to say so: re-record with `AR2DIFF_RECORD_GOLDEN=1 python -m pytest tests/test_golden.py` and explain why in the
commit. The curve was recorded on the code before the model/objective/trainer split (so this test proved the split
kept the numbers), re-recorded for the split SDPA of the training layout and again when its draft queries were
split into runs over the keys they can see; each moved it by at most 8.3e-8 relative (float reassociation).

Tolerance: rtol 1e-5, atol 1e-6 per logged value. The run is deterministic on one CPU process (same data, same
seeds), so on the recording machine the numbers agree bit-exactly; the slack only absorbs float reassociation from
a different BLAS/vector width on another CPU, far below what any change to the objective or the data moves.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny import GOLDEN, GOLDEN_KEYS, GOLDEN_OVERRIDES, env


def _curve(run_dir: Path) -> list[dict]:
    history = json.loads((run_dir / "summary.json").read_text())["history"]
    return [{"step": h["step"], **{k: h[k] for k in GOLDEN_KEYS}} for h in history if "train/loss" in h]


@pytest.mark.e2e
def test_tiny_tidar_run_reproduces_the_golden_loss_curve(tmp_path):
    cmd = [sys.executable, "-m", "ar2diff.train", *GOLDEN_OVERRIDES, f"data.cache_dir={tmp_path / 'cache'}",
           f"run_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    curve = _curve(tmp_path / "run")
    if os.environ.get("AR2DIFF_RECORD_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"overrides": GOLDEN_OVERRIDES, "curve": curve}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["overrides"] == GOLDEN_OVERRIDES, "the recorded curve belongs to other overrides: re-record it"
    assert [row["step"] for row in curve] == [row["step"] for row in golden["curve"]] == list(range(1, 9))
    for key in GOLDEN_KEYS:
        torch.testing.assert_close(torch.tensor([row[key] for row in curve], dtype=torch.float64),
                                   torch.tensor([row[key] for row in golden["curve"]], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
