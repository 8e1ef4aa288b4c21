"""Checkpoints (DeepSpeed, for exact resume) and exports (transformers safetensors folders, for shipping).

``export_layout`` needs no DeepSpeed and is imported eagerly, so the decoder can read exports cheaply;
the names from ``resume`` (which imports DeepSpeed) are loaded on first use.
"""

from ar2diff.checkpoint.export_layout import (ExportMetadata, RunAssets, export_model, is_complete_export,
                                              load_run_assets, read_metadata, save_run_assets)

_RESUME_NAMES = ("CheckpointRef", "capture_rng_state", "find_latest_complete", "load_checkpoint",
                 "prune_checkpoints", "resolve_checkpoint", "restore_rng_state", "save_checkpoint", "step_tag")

__all__ = ["ExportMetadata", "RunAssets", "export_model", "is_complete_export", "load_run_assets", "read_metadata",
           "save_run_assets", *_RESUME_NAMES]


def __getattr__(name: str):
    if name in _RESUME_NAMES:
        from ar2diff.checkpoint import resume

        return getattr(resume, name)
    raise AttributeError(f"module 'ar2diff.checkpoint' has no attribute {name!r}")
