"""The package's dependency directions (DESIGN.md): model/ and decode/ run without DeepSpeed, the trainer or the
data pipeline; config/ imports nothing that runs."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module,forbidden", [
    ("ar2diff.model", ("deepspeed", "ar2diff.trainer", "ar2diff.data.loader", "ar2diff.decode")),
    ("ar2diff.decode.tidar", ("deepspeed", "ar2diff.trainer", "ar2diff.data.loader")),
    ("ar2diff.objective", ("deepspeed", "ar2diff.trainer", "ar2diff.data.loader", "ar2diff.decode")),
    ("ar2diff.config.schema", ("deepspeed", "torch", "transformers", "ar2diff.trainer", "ar2diff.model")),
])
def test_import_does_not_pull_in(module, forbidden):
    code = (f"import sys, {module}; bad = [m for m in {forbidden!r} if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{module} imports {proc.stdout.strip()}: {proc.stderr[-500:]}"
