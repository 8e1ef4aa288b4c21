"""Load or build the transformers causal LM to convert. No `trust_remote_code`, weights only from safetensors.

Supported architectures and why each does or does not need an adapter for the TiDAR layout:
- llama, qwen3 (dense) and qwen3_moe, mixtral, olmoe (MoE, per-token routing without capacity limits): every
  interaction between positions happens in attention, which the TiDAR mask and position ids fully control.
- zaya: its CCA projection convolves q/k over the sequence and delays half of each value head by one position,
  outside attention; `ar2diff.model.zaya` makes those follow each stream's own predecessors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ar2diff.export_format import check_weights

# model_type -> needs a stream adapter (see module docstring)
SUPPORTED_MODEL_TYPES: dict[str, bool] = {
    "llama": False,
    "qwen3": False,
    "qwen3_moe": False,
    "mixtral": False,
    "olmoe": False,
    "zaya": True,
}
ATTN_IMPLEMENTATIONS = ("sdpa", "flex_attention", "eager")


def check_model_type(model_type: str) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unknown architecture model_type={model_type!r}; ar2diff supports {sorted(SUPPORTED_MODEL_TYPES)}. "
            "Set model.model_type (or the checkpoint's config.json) to one of these.")


def check_attn_implementation(model_type: str, attn_implementation: str) -> None:
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"model.attn_implementation={attn_implementation!r}; use one of {ATTN_IMPLEMENTATIONS}")
    if model_type == "olmoe" and attn_implementation == "flex_attention":
        raise ValueError("olmoe has no flex attention in transformers; set model.attn_implementation=sdpa")


def make_config(config: dict):
    """A transformers config from a plain dict that names its `model_type`."""
    from transformers import AutoConfig

    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise ValueError("model config has no 'model_type'; add e.g. model_type: qwen3_moe")
    check_model_type(model_type)
    return AutoConfig.for_model(model_type, **config)


def build_model(config, attn_implementation: str = "sdpa", dtype=None, seed: int | None = None) -> nn.Module:
    """A freshly initialised causal LM from a config dict (with `model_type`) or a transformers config."""
    from transformers import AutoModelForCausalLM

    hf_config = make_config(config) if isinstance(config, dict) else config
    check_model_type(hf_config.model_type)
    check_attn_implementation(hf_config.model_type, attn_implementation)
    if seed is not None:
        torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn_implementation, dtype=dtype)


def load_model(path: str | Path, attn_implementation: str = "sdpa", dtype=None, config=None) -> nn.Module:
    """A pretrained causal LM from a local HF folder holding config.json and safetensors weights.

    `config` replaces the folder's config (e.g. with RoPE overrides for context extension)."""
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model checkpoint folder {str(folder)!r} does not exist")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json; point model.path at a transformers "
                                "checkpoint folder")
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{str(folder)!r} has no *.safetensors weights; ar2diff loads only safetensors (convert a .bin "
            "checkpoint with transformers: model.save_pretrained(dest, safe_serialization=True))")

    check_weights(folder)  # an incomplete export or a truncated safetensors file is named here
    model_type = json.loads(config_file.read_text()).get("model_type")
    check_model_type(model_type)
    check_attn_implementation(model_type, attn_implementation)
    return AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation=attn_implementation, dtype=dtype, use_safetensors=True,
        trust_remote_code=False, **({"config": config} if config is not None else {}))


def max_positions(config) -> int | None:
    """The longest sequence the model's config allows (None when it states no limit)."""
    return getattr(config, "max_position_embeddings", None)
