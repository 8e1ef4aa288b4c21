"""A DeepSpeed checkpoint (any ZeRO stage, any world size) to the exported transformers layout
(checkpoint/export_layout.py): what the trainer's export callback and ``python -m ar2diff.export`` both call.

DeepSpeed's own ``zero_to_fp32`` consolidates the fp32 master weights from the per-rank shards; the model is rebuilt
(on the meta device) from the config the trainer saved under ``<ckpt_root>/hf/`` (``save_run_assets``), or from
``base`` when that folder is missing. Expert-parallel (DeepSpeed AutoEP) checkpoints, which zero_to_fp32 cannot
consolidate, go through ``ar2diff.checkpoint.autoep`` (ZeRO-0/1/2/3; Qwen3-MoE and Mixtral), picked automatically
from the checkpoint's completion marker. Before anything is read, the checkpoint's files are re-hashed against the
sha256 its marker records (``integrity.check_checkpoint_files``): a file changed since the save is refused by name,
never exported. The export records the sha256 of its own files in turn (``export_format.write_marker``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ar2diff.checkpoint.autoep import consolidate_autoep_checkpoint
from ar2diff.checkpoint.export_layout import (
    AR_PHASE,
    BLOCK_SIZE_CONFIG_KEY,
    RUN_ASSETS_DIRNAME,
    RUN_METADATA_NAME,
    RunAssets,
    export_model,
    load_run_assets,
)
from ar2diff.checkpoint.integrity import check_checkpoint_files
from ar2diff.checkpoint.resume import CheckpointRef, resolve_checkpoint
from ar2diff.checkpoint.safe_export import check_destination
from ar2diff.dtypes import TORCH_DTYPES


def consolidated_state_dict(ref: CheckpointRef, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a complete checkpoint, without a process group. ZeRO 1/2/3 go through
    DeepSpeed's zero_to_fp32; stage 0 (no ZeRO) stores the whole module in the model-states file.
    Expert-parallel (AutoEP) checkpoints go through ``consolidate_autoep_checkpoint``, which needs ``model``
    (the transformers model built from the trained config, meta device is fine) to name and shape the experts."""
    expert_parallel = ref.marker.get("expert_parallel") or any(ref.path.glob("layer_*_expert_*_model_states.pt"))
    if expert_parallel:
        if model is None:
            raise ValueError(f"{ref.path} is an expert-parallel (AutoEP) checkpoint: pass the transformers model "
                             "built from its config (consolidated_state_dict(ref, model))")

        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        return consolidate_autoep_checkpoint(ref.path, model.config.model_type, shapes)
    if ref.marker.get("zero_stage", 1) == 0:
        files = sorted(ref.path.glob("mp_rank_*_model_states.pt"))
        if len(files) != 1:
            raise ValueError(f"{ref.path}: expected one mp_rank_*_model_states.pt for a ZeRO-0 checkpoint, "
                             f"found {[f.name for f in files]} (tensor/pipeline-parallel checkpoints are unsupported)")
        module = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag)
    except (ValueError, NotImplementedError) as err:
        raise ValueError(f"DeepSpeed's zero_to_fp32 could not consolidate {ref.path}: {err}") from err


def _assets(ref: CheckpointRef, base: str | None, block_size: int | None) -> tuple[RunAssets, dict]:
    """Config/tokenizer (from ``--base`` or ``<root>/hf``) and the run metadata for ar2diff.json."""
    run_dir = ref.root / RUN_ASSETS_DIRNAME
    if base is None and not run_dir.is_dir():
        raise FileNotFoundError(
            f"{run_dir} is missing: the trainer writes the model config and tokenizer there "
            f"(save_run_assets). Pass --base MODEL_DIR to take them from a model folder instead.")
    assets = load_run_assets(base if base is not None else run_dir)
    run_meta_path = run_dir / RUN_METADATA_NAME
    if assets.metadata is not None:
        meta = dict(assets.metadata)
    else:
        meta = json.loads(run_meta_path.read_text()) if run_meta_path.is_file() else {}
    if base is not None:
        meta.setdefault("base_model", str(base))
    if "mask_token_id" not in meta:
        mask_id = getattr(assets.config, "mask_token_id", None)
        meta["mask_token_id"] = mask_id if mask_id is not None else assets.tokenizer.mask_token_id
    if block_size is not None:
        meta["block_size"] = block_size
    meta.setdefault("block_size", getattr(assets.config, BLOCK_SIZE_CONFIG_KEY, None))
    for key, flag in (("mask_token_id", "the tokenizer's mask_token"), ("block_size", "--block-size")):
        if meta[key] is None and not (key == "mask_token_id" and meta.get("phase") == AR_PHASE):
            raise ValueError(f"cannot tell the {key} of this checkpoint: no {run_meta_path}; set {flag}")
    return assets, meta


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, tag: str | None = None,
                      base: str | None = None, dtype: str = "auto", block_size: int | None = None,
                      extra_metadata: dict | None = None, max_shard_size: str = "2GB", overwrite: bool = True,
                      verify: bool = True) -> Path:
    """Export a complete DeepSpeed checkpoint (a root: its newest complete step or ``tag``; or a step
    folder) to ``out`` and return ``out``. Call on one process (the trainer: global rank 0 after the
    final save_checkpoint, then a barrier). ``dtype="auto"`` saves in the dtype of the saved config
    (float32 if it names none). ``extra_metadata`` is merged last into ar2diff.json (e.g. the trainer's
    own ``step``/``tokens_seen``). ``overwrite=True`` replaces an existing export atomically.
    ``verify``: re-hash the checkpoint's files first and refuse (ValueError naming the file) one that changed since
    the save; the newest checkpoint is not silently swapped for an older one (``tag`` picks one)."""
    from transformers import AutoModelForCausalLM

    ref = resolve_checkpoint(checkpoint, tag)
    out = Path(out)
    check_destination(out, overwrite, protect=[ref.root, ref.path])  # before any work; refuses run folders
    if verify:
        check_checkpoint_files(ref)
    assets, meta = _assets(ref, base, block_size)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(assets.config)
    state_dict = consolidated_state_dict(ref, model)
    target = _resolve_dtype(dtype, assets.config)
    # ZAYA's router balancing biases stay fp32: their updates (~1e-3) vanish in a bf16 cast
    state_dict = {k: v.to(target) if v.is_floating_point() and not k.endswith("balancing_biases") else v
                  for k, v in state_dict.items()}
    if assets.generation_config is not None:
        model.generation_config = assets.generation_config
    meta.pop("ar2diff_version", None)
    meta.update(step=ref.step, tokens_seen=ref.marker.get("client_summary", {}).get("tokens_seen"),
                source_checkpoint=str(ref.path.resolve()))
    meta.update(extra_metadata or {})
    return export_model(model, assets.tokenizer, out, meta, state_dict=state_dict,
                        max_shard_size=max_shard_size, overwrite=overwrite)


def _resolve_dtype(name: str, config) -> torch.dtype:
    if name == "auto":
        saved = getattr(config, "dtype", None)
        saved = getattr(torch, saved) if isinstance(saved, str) else saved
        return saved if saved in TORCH_DTYPES.values() else torch.float32
    if name not in TORCH_DTYPES:
        raise ValueError(f"--dtype {name!r} is not one of auto, {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]
