"""Load or build the transformers causal LM to convert. No `trust_remote_code`, weights only from safetensors.

Supported architectures and why each does or does not need an adapter for the TiDAR layout:
- llama, qwen3 (dense) and qwen3_moe, mixtral, olmoe (MoE, per-token routing without capacity limits): every
  interaction between positions happens in attention, which the TiDAR mask and position ids fully control.
- zaya: its CCA projection convolves q/k over the sequence and delays half of each value head by one position,
  outside attention; `ar2diff.model.zaya` makes those follow each stream's own predecessors.

Before transformers reads a folder, its files are checked (`ar2diff.export_format`): sizes and safetensors headers
always, and the sha256 an ar2diff export records for every file (`verify_export_files`), shared out over the ranks
when every rank loads the same export (`collective=True`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import nn

from ar2diff.export_format import (
    EXPORT_MARKER_NAME,
    METADATA_NAME,
    check_weights,
    export_hash_error,
    hash_mismatches,
    hash_share,
    recorded_hashes,
    unreadable_safetensors,
    verify_by_default,
)

log = logging.getLogger(__name__)

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


def load_model(path: str | Path, attn_implementation: str = "sdpa", dtype=None, config=None, *,
               verify: bool | None = None, collective: bool = False) -> nn.Module:
    """A pretrained causal LM from a local HF folder holding config.json and safetensors weights.

    `config` replaces the folder's config (e.g. with RoPE overrides for context extension). `verify`: re-hash the
    files of an ar2diff export against the sha256 its marker records (None: yes unless AR2DIFF_VERIFY_EXPORTS=0).
    `collective`: every rank of the default process group loads this same folder now (the trainer's model.path), so
    each hashes a share of the files; leave it False when one rank loads alone (the others would not join)."""
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

    check_weights(folder)  # an incomplete export or a truncated or corrupt safetensors file is named here
    if verify_by_default() if verify is None else verify:
        verify_export_files(folder, collective=collective)
    model_type = json.loads(config_file.read_text()).get("model_type")
    check_model_type(model_type)
    check_attn_implementation(model_type, attn_implementation)
    try:
        return AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation=attn_implementation, dtype=dtype, use_safetensors=True,
            trust_remote_code=False, **({"config": config} if config is not None else {}))
    except SafetensorError as err:  # past the header check_weights read, transformers could not read a file
        files = sorted(folder.glob("*.safetensors"))
        raise unreadable_safetensors(files[0] if len(files) == 1 else f"a safetensors file in {folder}", err) from None


def verify_export_files(folder: str | Path, *, collective: bool = False) -> None:
    """Raise ValueError naming the files of the ar2diff export `folder` whose sha256 no longer matches its marker (a
    same-size bit flip passes the size check). A plain transformers folder has nothing to verify; an export written
    before the hashes were recorded loads with a warning.

    `collective`: with torch.distributed initialized, rank r of P hashes the files r, r + P, ... (largest first) and
    the verdicts are all-gathered, so 64 ranks loading one 16 GB export read it once between them, not 64 times;
    every rank raises the same error. Call it on every rank then, or on none."""
    folder = Path(folder)
    ranked = collective and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if ranked else (0, 1)
    hashes = recorded_hashes(folder)
    if hashes is None:
        if (folder / METADATA_NAME).is_file() and rank == 0:
            log.warning("%s records no sha256 (an export by an older ar2diff): its files are loaded unverified; "
                        "export the checkpoint again to record them", folder / EXPORT_MARKER_NAME)
        return
    bad = hash_mismatches(folder, hashes, hash_share(folder, hashes, rank, world))
    if ranked:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, bad)
        bad = [name for part in gathered for name in part]
    if bad:
        raise export_hash_error(folder, bad)


def max_positions(config) -> int | None:
    """The longest sequence the model's config allows (None when it states no limit)."""
    return getattr(config, "max_position_embeddings", None)
