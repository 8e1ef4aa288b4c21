"""The export format: file names, ``ar2diff.json`` metadata and the completeness and integrity checks, with no torch.

An export folder holds ``config.json`` (with ``mask_token_id`` and ``tidar_block_size``), safetensors
weights (``model.safetensors`` or shards + ``model.safetensors.index.json``), ``generation_config.json``,
the tokenizer (its ``mask_token`` is the token of ``mask_token_id``), ``ar2diff.json`` (metadata) and
``ar2diff_export_complete.json`` (the completion marker: size and sha256 of every file). Writing it is
``ar2diff.checkpoint.export_layout``; this module is what every reader (data, model loading, decode) checks.

Checks on a model folder before transformers reads it, so a bad file is named in one line:

- An ar2diff export (it has ``ar2diff.json``) must pass the export completeness check (marker present, every listed
  file at its recorded size; cheap, done on every read) and, when loading its weights, the integrity check (every
  listed file at its recorded sha256, which catches a same-size bit flip; ``AR2DIFF_VERIFY_EXPORTS=0`` or
  ``verify=False`` skips it). An export written before the sha256 were recorded loads with a warning.
- Every ``*.safetensors`` header is read, which catches a truncated or corrupted file, also in a plain transformers
  checkpoint (a base model, no marker).
- A tokenizer folder needs its tokenizer files: ``tokenizer_config.json`` without ``tokenizer.json`` (or a
  sentencepiece/BPE vocabulary) would otherwise surface as transformers' "install sentencepiece or tiktoken".
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Mapping

from safetensors import SafetensorError, safe_open

from ar2diff.fs import sha256_file

log = logging.getLogger(__name__)

METADATA_NAME = "ar2diff.json"
EXPORT_MARKER_NAME = "ar2diff_export_complete.json"
RUN_ASSETS_DIRNAME = "hf"
RUN_METADATA_NAME = "ar2diff_run.json"
BLOCK_SIZE_CONFIG_KEY = "tidar_block_size"
# Set to 0 (or false/no/off) to load exports without re-hashing their files (the size check still runs).
VERIFY_ENV = "AR2DIFF_VERIFY_EXPORTS"


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


def sha256_files(paths: list[Path], workers: int | None = None) -> list[str | None]:
    """The sha256 of each file (None where it cannot be read), hashed by a few threads at once: hashlib releases
    the GIL on large reads, so shards and per-rank checkpoint files hash in parallel on a parallel filesystem."""

    def one(path: Path) -> str | None:
        try:
            return sha256_file(path)
        except OSError:
            return None

    workers = workers or min(8, os.cpu_count() or 1, max(len(paths), 1))
    if workers == 1 or len(paths) < 2:
        return [one(path) for path in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, paths))


def write_marker(folder: Path) -> None:
    """Write the completion marker of the export in ``folder``: the byte size (``files``, what every ar2diff
    version reads) and the sha256 (``sha256``) of every file in it. Call last, once every other file is written."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    files = {name: (folder / name).stat().st_size for name in names}
    hashes = dict(zip(names, sha256_files([folder / name for name in names])))
    marker = {"files": files, "sha256": hashes}
    (folder / EXPORT_MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True))


# -------------------------------------------------------------------------------------- reading


def read_export_marker(folder: Path) -> tuple[dict | None, str]:
    """(marker, "") if ``folder``'s completion marker is a JSON object of the shape ``write_marker`` writes (the
    ``sha256`` map may be absent: an older export), else (None, why not, naming the file and what to do)."""
    marker_path = folder / EXPORT_MARKER_NAME
    if not marker_path.is_file():
        return None, f"{folder} has no {EXPORT_MARKER_NAME}: the export was interrupted; export it again"
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError) as err:
        return None, f"{marker_path} is unreadable ({err}); export it again"
    files = marker.get("files") if isinstance(marker, dict) else None
    hashes = marker.get("sha256", {}) if isinstance(marker, dict) else None
    if not (isinstance(files, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in files.values())
            and isinstance(hashes, dict) and all(isinstance(v, str) for v in hashes.values())):
        return None, (f"{marker_path} is not an ar2diff export marker (a JSON object of file sizes and sha256); "
                      "export it again")
    return marker, ""


def check_export(folder: Path) -> str:
    """'' if ``folder`` is a complete export (every listed file present at its recorded size), else why not."""
    if not folder.is_dir():
        return f"{folder} does not exist or is not a folder"
    if not (folder / METADATA_NAME).is_file():
        return (f"{folder} has no {METADATA_NAME}: it is not an ar2diff export "
                f"(create one with python -m ar2diff.export)")
    marker, reason = read_export_marker(folder)
    if marker is None:
        return reason
    for name, size in marker["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{path} is missing or has the wrong size; export it again"
    return ""


def verify_by_default() -> bool:
    """Whether loaders re-hash an export's files unless told otherwise: yes, unless ``AR2DIFF_VERIFY_EXPORTS`` is
    0/false/no/off."""
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def recorded_hashes(folder: Path) -> dict[str, str] | None:
    """{file name: sha256} from the marker of the complete export ``folder``; None for an export written before the
    hashes were recorded (or for a folder that is no ar2diff export: nothing to verify)."""
    if check_export(folder):
        return None
    hashes = read_export_marker(folder)[0].get("sha256")
    return hashes or None


def hash_share(folder: Path, hashes: dict[str, str], rank: int, world: int) -> list[str]:
    """The files rank ``rank`` of ``world`` hashes when several processes load one export: by size, largest first,
    dealt out in turn (rank r takes files r, r + world, ...), so the shards spread evenly over the ranks."""

    def size(name: str) -> int:
        try:
            return (folder / name).stat().st_size
        except OSError:  # a missing file is a mismatch; whichever rank takes it reports it
            return 0

    return sorted(hashes, key=lambda name: (-size(name), name))[rank::world]


def hash_mismatches(folder: Path, hashes: dict[str, str], names: list[str]) -> list[str]:
    """Those of ``names`` whose bytes no longer match their recorded sha256 (or that cannot be read)."""
    actual = sha256_files([folder / name for name in names])
    return [name for name, digest in zip(names, actual) if digest != hashes[name]]


def export_hash_error(folder: Path, bad: list[str]) -> ValueError:
    """The one-line error for an export whose files ``bad`` changed after it was written."""
    bad = sorted(bad)
    shown = ", ".join(str(folder / name) for name in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    verb = "does not match its" if len(bad) == 1 else "do not match their"
    return ValueError(f"{shown} {verb} sha256 in {folder / EXPORT_MARKER_NAME} (changed or corrupted after the "
                      f"export): export it again or restore the file; to load it anyway, pass --no-verify (or set "
                      f"{VERIFY_ENV}=0)")


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
    """Raise ValueError naming the incomplete export or the unreadable safetensors file in `folder`.

    Cheap (sizes and headers only); the sha256 of an export's files are `recorded_hashes` / `hash_mismatches`."""
    folder = Path(folder)
    if (folder / METADATA_NAME).is_file():
        reason = check_export(folder)
        if reason:
            raise ValueError(f"incomplete ar2diff export: {reason}")
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise unreadable_safetensors(file, err) from None


def unreadable_safetensors(file: str | Path, err: BaseException) -> ValueError:
    """The one-line error for a safetensors file whose header safetensors cannot read (truncated, corrupted)."""
    reason = " ".join(str(err).split()) or type(err).__name__
    return ValueError(f"{file}: not a readable safetensors file ({reason}): re-export or re-download it")


def check_tokenizer_files(folder: str | Path) -> None:
    """Raise FileNotFoundError if `folder` has a tokenizer config but no tokenizer vocabulary file."""
    folder = Path(folder)
    if (folder / "tokenizer_config.json").is_file() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder / 'tokenizer.json'} is missing (the folder has tokenizer_config.json but "
                                "no tokenizer vocabulary); copy the tokenizer files of this model into it")
