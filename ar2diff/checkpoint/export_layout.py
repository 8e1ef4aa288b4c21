"""The exported checkpoint: a transformers folder that loads with no ar2diff code.

An export folder holds ``config.json`` (with ``mask_token_id`` and ``tidar_block_size``), safetensors
weights (``model.safetensors`` or shards + ``model.safetensors.index.json``), ``generation_config.json``,
the tokenizer (its ``mask_token`` is the token of ``mask_token_id``), ``ar2diff.json`` (metadata) and
``ar2diff_export_complete.json`` (the completion marker: size and sha256 of every file). It is written into
``<dest>.tmp-<pid>`` and renamed onto ``dest`` only when complete.

``save_run_assets`` writes what an export needs besides the weights (config, tokenizer, generation
config, run metadata) to ``<ckpt_root>/hf/`` when training starts; ``python -m ar2diff.export`` turns a
DeepSpeed checkpoint plus these assets into an export. No DeepSpeed here.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ar2diff.checkpoint.safe_export import check_destination, check_finite
from ar2diff.export_format import (  # noqa: F401 (the format's names, re-exported for writers)
    AR_PHASE,
    BLOCK_SIZE_CONFIG_KEY,
    EXPORT_MARKER_NAME,
    METADATA_NAME,
    RUN_ASSETS_DIRNAME,
    RUN_METADATA_NAME,
    ExportMetadata,
    ar2diff_version,
    check_export,
    is_complete_export,
    read_metadata,
    write_marker,
)
from ar2diff.fs import atomic_folder, make_world_readable

# ---------------------------------------------------------------------------------------- export


def export_model(model: nn.Module, tokenizer, dest: str | os.PathLike, metadata: Mapping[str, Any] | ExportMetadata,
                 state_dict: Mapping[str, torch.Tensor] | None = None, max_shard_size: int | str = "2GB", *,
                 overwrite: bool = True) -> Path:
    """Write the export folder ``dest`` from ``model``'s class/config/generation config, ``tokenizer``
    and ``state_dict`` (default: ``model.state_dict()``; pass the consolidated weights for ZeRO-3).

    The weights are loaded strictly into a fresh meta-device copy of the model, so a missing or
    unexpected key fails here, tied embeddings stay tied and the saved dtype is the state dict's.
    The tokenizer and config are copied, never modified. Returns ``dest``.
    """
    meta = ExportMetadata.from_mapping(metadata)
    model = _unwrap(model)
    dest = Path(dest)
    check_destination(dest, overwrite)  # only a complete export is ever replaced; never a run or a file
    skeleton = build_loaded_skeleton(type(model), model.config, state_dict if state_dict is not None
                                     else model.state_dict())
    check_finite(skeleton.state_dict(), f"to {dest}")
    skeleton.config.mask_token_id = meta.mask_token_id
    setattr(skeleton.config, BLOCK_SIZE_CONFIG_KEY, meta.block_size)
    if getattr(model, "generation_config", None) is not None:
        skeleton.generation_config = copy.deepcopy(model.generation_config)
    tokenizer = _with_mask_token(tokenizer, meta.mask_token_id, skeleton.config)

    with atomic_folder(dest, marker=EXPORT_MARKER_NAME) as tmp:  # only a complete export ever sits at dest
        skeleton.save_pretrained(tmp, state_dict=skeleton.state_dict(), max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        (tmp / METADATA_NAME).write_text(json.dumps(meta.to_json_dict(), indent=2, sort_keys=True))
        write_marker(tmp)
        make_world_readable(tmp)
    return dest


def build_loaded_skeleton(model_cls, config, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """A ``model_cls`` built from a copy of ``config`` on the meta device, then given ``state_dict``'s
    tensors (strict: missing/unexpected keys and shape mismatches raise, naming the keys).
    Wrapper prefixes are stripped (``strip_wrapper_prefix``); a tied weight absent from the state dict
    (e.g. ``lm_head.weight`` with tied embeddings) is taken from its source."""
    with torch.device("meta"):
        skeleton = model_cls._from_config(copy.deepcopy(config))
    expected = set(skeleton.state_dict())
    sd = strip_wrapper_prefix(state_dict, expected)
    for target, source in (getattr(skeleton, "all_tied_weights_keys", None) or {}).items():
        if target not in sd and source in sd:
            sd[target] = sd[source]
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match {model_cls.__name__} built from the config: missing keys "
            f"{_head(missing)}, unexpected keys {_head(unexpected)}. Check that the config is the one the "
            f"checkpoint was trained with (e.g. resized vocab, layer count) and that no wrapper renamed params.")
    try:
        skeleton.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"state dict does not fit {model_cls.__name__} built from the config: {err}") from err
    skeleton.tie_weights()
    return skeleton


def strip_wrapper_prefix(state_dict: Mapping[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Keys without the prefix that wrappers add around the transformers model: ``module.`` (DDP,
    DeepSpeed) and the attribute path of a wrapping module (e.g. ``lm.`` of ar2diff's TidarLM).
    The prefix is the part before the longest dotted suffix of a key that is an ``expected`` key;
    keys without that prefix are kept as they are (and reported as unexpected by the strict load)."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if not sd or any(k in expected for k in sd):
        return sd
    for key in sd:
        parts = key.split(".")
        prefix = next((".".join(parts[:i]) + "." for i in range(1, len(parts)) if ".".join(parts[i:]) in expected),
                      None)
        if prefix is not None:
            return {k.removeprefix(prefix): v for k, v in sd.items()}
    return sd


def _head(keys: list[str], n: int = 8) -> str:
    return "[]" if not keys else f"{keys[:n]}" + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside wrappers that keep it as ``.module`` (DeepSpeedEngine, DDP)."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise TypeError(f"export_model needs a transformers PreTrainedModel, got {type(model).__name__}")
    return model


def _with_mask_token(tokenizer, mask_token_id: int | None, config) -> Any:
    """A copy of ``tokenizer`` whose mask_token is the token with id ``mask_token_id`` (as is for an AR base)."""
    if tokenizer is None:
        raise ValueError("export_model needs the tokenizer (the export must carry its mask_token)")
    if mask_token_id is None:
        return tokenizer
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None and mask_token_id >= vocab_size:
        raise ValueError(f"mask_token_id {mask_token_id} is outside the model vocab (config.vocab_size={vocab_size})")
    token = tokenizer.convert_ids_to_tokens(mask_token_id)
    if token is None:
        raise ValueError(f"mask_token_id {mask_token_id} is not in the tokenizer ({len(tokenizer)} tokens)")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.mask_token = token
    if tokenizer.mask_token_id != mask_token_id:
        raise ValueError(f"tokenizer maps mask token {token!r} back to id {tokenizer.mask_token_id}, not "
                         f"{mask_token_id}: the token string is ambiguous in this tokenizer")
    return tokenizer


# ------------------------------------------------------------------------------------ run assets


def save_run_assets(ckpt_root: str | os.PathLike, model_config, tokenizer, metadata: Mapping[str, Any],
                    generation_config=None) -> Path:
    """Write ``<ckpt_root>/hf/``: ``config.json`` (the model's config as trained, e.g. with the
    resized vocab), tokenizer files, ``generation_config.json`` if given, and ``ar2diff_run.json``
    (``metadata``: at least mask_token_id and block_size; phase, recipe, base_model…).

    The trainer calls this once per run on one process (global rank 0) before the first checkpoint;
    ``python -m ar2diff.export`` rebuilds the model from it. Written atomically; rewriting replaces it.
    """
    meta = ExportMetadata.from_mapping(metadata)
    dest = Path(ckpt_root) / RUN_ASSETS_DIRNAME
    with atomic_folder(dest) as tmp:
        model_config.save_pretrained(tmp)
        _with_mask_token(tokenizer, meta.mask_token_id, model_config).save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        run_meta = {k: v for k, v in meta.to_json_dict().items() if v is not None}
        (tmp / RUN_METADATA_NAME).write_text(json.dumps(run_meta, indent=2, sort_keys=True))
    return dest


@dataclass
class RunAssets:
    """What ``load_run_assets`` returns: transformers config, tokenizer, generation config (or None)
    and the run metadata dict (None when the folder is a plain model folder without ar2diff_run.json)."""

    config: Any
    tokenizer: Any
    generation_config: Any
    metadata: dict[str, Any] | None


def load_run_assets(folder: str | os.PathLike) -> RunAssets:
    """Read a ``save_run_assets`` folder, or any local transformers model folder (config + tokenizer)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a saved model/run-assets folder")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    gen = (GenerationConfig.from_pretrained(folder, local_files_only=True)
           if (folder / "generation_config.json").is_file() else None)
    meta_path = folder / RUN_METADATA_NAME
    metadata = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    return RunAssets(config=config, tokenizer=tokenizer, generation_config=gen, metadata=metadata)
