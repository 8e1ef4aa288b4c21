"""Decode CLI argument checks and model-folder checks: one line naming the device, flag or file."""

from __future__ import annotations

import importlib.util
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from ar2diff.decode.cli import main
from ar2diff.decode.cli_checks import check_device, ignored_flags, warn_block_size
from ar2diff.export_format import check_tokenizer_files, check_weights

_spec = importlib.util.spec_from_file_location("ckpt_worker", Path(__file__).with_name("ckpt_worker.py"))
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_on_a_cpu_machine_is_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="--device cuda: no CUDA/ROCm device"):
        check_device("cuda")
    assert main(["--checkpoint", str(tmp_path), "--prompt", "x", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_ignored_flags_and_block_size_above_trained_warn(capsys):
    args = Namespace(sampler="ar", levels=(4, 7), block_size=None, drafter_temperature=0.5)
    assert ignored_flags(args) == ["--levels", "--drafter-temperature"]
    assert ignored_flags(Namespace(sampler="lossless", levels=(4,), block_size=8, drafter_temperature=None)) == []
    warn_block_size(64, 8)
    warn_block_size(8, 8)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "--block-size 64 exceeds the block size the model was trained with (8)" in err


@pytest.fixture
def export(tmp_path):
    from ar2diff.checkpoint.export_layout import export_model

    return export_model(W.tiny_model("llama", seed=0), W.tiny_tokenizer(), tmp_path / "e", W.RUN_META)


def test_truncated_export_and_plain_safetensors_are_named(export, tmp_path):
    from ar2diff.model.loading import load_model

    weights = export / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"incomplete ar2diff export: {weights} is missing or has the wrong size"):
        load_model(export)
    plain = tmp_path / "plain"  # a base model: no ar2diff marker, only safetensors to check
    plain.mkdir()
    for f in export.iterdir():
        if f.name not in ("ar2diff.json", "ar2diff_export_complete.json"):
            (plain / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match=f"{plain / 'model.safetensors'}: not a readable safetensors file"):
        check_weights(plain)
    (plain / "model.safetensors").write_bytes(data)
    check_weights(plain)
    assert load_model(plain).config.model_type == "llama"


def test_missing_tokenizer_json_is_named(export):
    check_tokenizer_files(export)
    (export / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{export / 'tokenizer.json'} is missing"):
        check_tokenizer_files(export)
