"""Checkpoints (DeepSpeed, for exact resume) and exports (transformers safetensors folders, for shipping).

Import from the modules, each at its own layer (docs/design.md, "Package layers"): ``export_layout`` (write an
export), ``reader`` (``load_export``), ``safe_export`` (where an export may go) need no DeepSpeed; ``manifest`` (what
makes a step folder complete), ``resume`` (save and load), ``integrity``, ``coordination``, ``export`` (a DeepSpeed
checkpoint to an export) and ``autoep`` sit above the model and the decoders.
"""
