"""`python -m ar2diff.evaluate --checkpoint EXPORT`: the phase-end check on an export, outside training."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from ar2diff.evaluate import main

_spec = importlib.util.spec_from_file_location("ckpt_worker", Path(__file__).with_name("ckpt_worker.py"))
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)

DATA = ["data.sources.0.path=json/*", "data.seq_len=32", "data.heldout_fraction=0.5", "decoder.num_prompts=2",
        "decoder.prompt_len=4", "decoder.max_new_tokens=6", "decoder.mix_weights=[0.5]", "trainer.heldout_batches=1",
        "deepspeed.micro_batch_size=2", "objective.block_size=4"]


@pytest.fixture
def export(tmp_path):
    from ar2diff.checkpoint.export_layout import export_model

    return export_model(W.tiny_model("llama", seed=0), W.tiny_tokenizer(), tmp_path / "e", {**W.RUN_META, "step": 7})


def test_evaluate_runs_the_phase_end_check_on_an_export(export, tmp_path):
    out = tmp_path / "out"
    assert main(["--checkpoint", str(export), "--out", str(out), f"data.cache_dir={tmp_path / 'c'}", *DATA]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["step"] == 7 and set(result["samplers"]) == {"ar", "lossless", "mixing_0.5"}
    assert result["samplers"]["lossless"]["agreement_tokens"] == 1.0  # greedy lossless equals AR exactly
    assert result["heldout"]["tokens_ar"] > 0


def test_incomplete_export_is_a_one_line_error(export, tmp_path, capsys):
    weights = export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    assert main(["--checkpoint", str(export)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{weights} is missing or has the wrong size" in err


def test_light_runs_the_light_check_into_out_and_prints_its_numbers(export, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--checkpoint", str(export), "--out", str(out), "--light", f"data.cache_dir={tmp_path / 'c'}", *DATA,
            "decoder.light_prompts=2"]
    assert main(args) == 0
    result = json.loads((out / "light_eval.json").read_text())
    assert not (out / "eval.json").exists() and not (export / "light_eval.json").exists()
    assert result["step"] == 7 and result["greedy"]["prompts"] == 2
    assert result["greedy"]["agreement_tokens"] == 1.0  # fp32 greedy lossless equals AR
    assert len(result["agreement_by_offset"]["argmax_agree"]) == 4  # objective.block_size=4
    printed = capsys.readouterr().out
    assert f"{result['heldout']['loss_ar']:.4f}" in printed and "tokens/forward" in printed
