"""The package's dependency directions (README "Layout"): model/ knows no loss, objective/ no trainer, decode/ runs
without DeepSpeed, the trainer or the data pipeline; checkpoint/'s export reader needs no DeepSpeed; config/ imports
nothing that runs; the command-line modules answer --help without DeepSpeed."""

import subprocess
import sys

import pytest

RUNTIME = ("deepspeed", "ar2diff.trainer", "ar2diff.data.loader")


@pytest.mark.parametrize("module,forbidden", [
    ("ar2diff.model", (*RUNTIME, "ar2diff.decode", "ar2diff.objective", "ar2diff.checkpoint")),
    ("ar2diff.objective", (*RUNTIME, "ar2diff.decode", "ar2diff.checkpoint")),
    ("ar2diff.decode.tidar", (*RUNTIME, "ar2diff.objective", "ar2diff.checkpoint")),
    ("ar2diff.decode.ar", (*RUNTIME, "ar2diff.objective", "ar2diff.checkpoint")),
    ("ar2diff.decode.cli", RUNTIME),
    ("ar2diff.decode.evaluate", RUNTIME),
    ("ar2diff.checkpoint.reader", RUNTIME),
    ("ar2diff.export", RUNTIME),
    ("ar2diff.config.schema", ("deepspeed", "torch", "transformers", "ar2diff.trainer", "ar2diff.model")),
    ("ar2diff.fs", ("torch", "ar2diff.model", "ar2diff.trainer")),
])
def test_import_does_not_pull_in(module, forbidden):
    code = (f"import sys, {module}; bad = [m for m in {forbidden!r} if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{module} imports {proc.stdout.strip()}: {proc.stderr[-500:]}"


def test_model_adapter_has_no_loss():
    """The split: TidarLM computes hidden states and logits; losses live in ar2diff.objective."""
    from ar2diff.model.tidar import TidarLM

    assert not any(hasattr(TidarLM, name) for name in ("forward_ar", "balancing_loss", "alpha", "aux_coef"))
