"""Loading and building models: supported architectures, safetensors only, clear errors."""

import json

import pytest
import torch

from ar2diff.model import build_model, load_model
from tiny import TINY_CONFIGS


def test_load_roundtrip_from_safetensors_folder(tmp_path):
    lm = build_model(TINY_CONFIGS["zaya"], seed=0)
    lm.save_pretrained(tmp_path, safe_serialization=True)
    again = load_model(tmp_path)
    ids = torch.randint(3, 90, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, lm(input_ids=ids).logits)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown architecture model_type='gpt2'"):
        build_model({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="no 'model_type'"):
        build_model({"hidden_size": 8})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="olmoe has no flex attention"):
        build_model(TINY_CONFIGS["olmoe"], attn_implementation="flex_attention")
