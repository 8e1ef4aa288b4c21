"""The export format: file names, ``ar2diff.json`` metadata and the completeness check, with no torch.

An export folder holds ``config.json`` (with ``mask_token_id`` and ``tidar_block_size``), safetensors
weights (``model.safetensors`` or shards + ``model.safetensors.index.json``), ``generation_config.json``,
the tokenizer (its ``mask_token`` is the token of ``mask_token_id``), ``ar2diff.json`` (metadata) and
``ar2diff_export_complete.json`` (the completion marker: sizes of every file). Writing it is
``ar2diff.checkpoint.export_layout``; this module is what every reader (data, model loading, decode) checks.

Folder checks before transformers reads a folder, so a bad file is named in one line:Checks on a model folder before transformers reads it, so a bad file is named in one line.

An ar2diff export (it has ``ar2diff.json``) must pass the export completeness check (marker present, every listed
file at its recorded size). A plain transformers checkpoint (a base model) has no marker: each ``*.safetensors``
header is read, which catches a truncated or non-safetensors file. A tokenizer folder needs its tokenizer files:
``tokenizer_config.json`` without ``tokenizer.json`` (or a sentencepiece/BPE vocabulary) would otherwise surface
as transformers' "install sentencepiece or tiktoken".
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Mapping

from safetensors import SafetensorError, safe_open

METADATA_NAME = "ar2diff.json"
EXPORT_MARKER_NAME = "ar2diff_export_complete.json"
RUN_ASSETS_DIRNAME = "hf"
RUN_METADATA_NAME = "ar2diff_run.json"
BLOCK_SIZE_CONFIG_KEY = "tidar_block_size"


def ar2diff_version() -> str:
    try:
        return importlib_metadata.version("ar2diff")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


AR_PHASE = "ar_pretrain"


@dataclass
class ExportMetadata:
    """What ``ar2diff.json`` records. Keys beyond the named fields are kept in ``extra``.

    An AR base (phase ``ar_pretrain``) has no mask token yet: its mask_token_id is None.
    """

    mask_token_id: int | None
    block_size: int
    phase: str | None = None
    recipe: str | None = None
    tokens_seen: int | None = None
    step: int | None = None
    source_checkpoint: str | None = None
    base_model: str | None = None
    ar2diff_version: str = field(default_factory=ar2diff_version)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mask_token_id is None and self.phase == AR_PHASE:
            pass
        elif not isinstance(self.mask_token_id, int) or isinstance(self.mask_token_id, bool) or self.mask_token_id < 0:
            raise ValueError(f"metadata mask_token_id must be a non-negative int, got {self.mask_token_id!r}")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
            raise ValueError(f"metadata block_size must be a positive int, got {self.block_size!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ExportMetadata":
        """Named keys become fields, the rest go to ``extra``; missing required keys are named."""
        if isinstance(values, ExportMetadata):
            return copy.deepcopy(values)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        required = ("block_size",) if values.get("phase") == AR_PHASE else ("mask_token_id", "block_size")
        missing = [k for k in required if values.get(k) is None]
        if missing:
            raise ValueError(f"export metadata lacks {missing}: pass them in the metadata dict")
        known = {k: v for k, v in values.items() if k in names}
        extra = {**values.get("extra", {}), **{k: v for k, v in values.items() if k not in names and k != "extra"}}
        return cls(**known, extra=extra)

    def to_json_dict(self) -> dict[str, Any]:
        """Flat JSON object: extras first, so they can never overwrite a named field."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        return {**self.extra, **fields}


def write_marker(folder: Path) -> None:
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / EXPORT_MARKER_NAME).write_text(json.dumps({"files": files}, indent=2, sort_keys=True))


# -------------------------------------------------------------------------------------- reading


def check_export(folder: Path) -> str:
    """'' if ``folder`` is a complete export, else why not."""
    if not folder.is_dir():
        return f"{folder} does not exist or is not a folder"
    if not (folder / METADATA_NAME).is_file():
        return (f"{folder} has no {METADATA_NAME}: it is not an ar2diff export "
                f"(create one with python -m ar2diff.export)")
    marker = folder / EXPORT_MARKER_NAME
    if not marker.is_file():
        return f"{folder} has no {EXPORT_MARKER_NAME}: the export was interrupted; export it again"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"{marker} is unreadable ({err}); export it again"
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{path} is missing or has the wrong size; export it again"
    return ""


def is_complete_export(folder: str | os.PathLike) -> bool:
    """True if ``folder`` holds metadata, the completion marker, and every file the marker lists."""
    return check_export(Path(folder)) == ""


def read_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``ar2diff.json`` dict of a complete export; raises FileNotFoundError / ValueError saying why not."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"export folder {folder} does not exist")
    reason = check_export(folder)
    if reason:
        raise ValueError(reason)
    return json.loads((folder / METADATA_NAME).read_text())


# ----------------------------------------------------------------------------------- folder checks


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def check_weights(folder: str | Path) -> None:
    """Raise ValueError naming the incomplete export or the unreadable safetensors file in `folder`."""
    folder = Path(folder)
    if (folder / METADATA_NAME).is_file():
        reason = check_export(folder)
        if reason:
            raise ValueError(f"incomplete ar2diff export: {reason}")
        return
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{file} is not a complete safetensors file ({err}); copy or download it again") from None


def check_tokenizer_files(folder: str | Path) -> None:
    """Raise FileNotFoundError if `folder` has a tokenizer config but no tokenizer vocabulary file."""
    folder = Path(folder)
    if (folder / "tokenizer_config.json").is_file() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder / 'tokenizer.json'} is missing (the folder has tokenizer_config.json but "
                                "no tokenizer vocabulary); copy the tokenizer files of this model into it")
