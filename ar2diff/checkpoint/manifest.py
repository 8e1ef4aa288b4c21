"""What makes a checkpoint folder complete, read without DeepSpeed: names, the completion marker, lookup.

A step folder ``step_XXXXXXXX`` is complete when it holds ``ar2diff_complete.json`` whose manifest (size and sha256
of every file) matches the files on disk. ``find_latest_complete`` and ``resolve_checkpoint`` only ever return such a
folder; half-written saves (``.partial``, or no marker) are never used, and neither is a folder whose marker is not
the JSON object ``save_checkpoint`` writes (``read_marker``). ``scan_checkpoints`` also reports the folders that were
complete once and fail now: when none passes, resume refuses (``NoVerifiedCheckpoint``) instead of starting from
step 0 over them. The save itself is in ``resume``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ar2diff.fs import sha256_file

log = logging.getLogger(__name__)

MARKER_NAME = "ar2diff_complete.json"
LATEST_NAME = "latest"
PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".replaced"
RNG_FILE = "rng_state_rank{rank:05d}.pt"
TAG_RE = re.compile(r"^step_(\d{8,})$")
Verify = Literal["size", "hash"]
# What resume and export read from a completion marker, and the JSON type each must have. Anything else (a list, a
# number, a dict without these keys) is a marker that was not written by save_checkpoint: the folder is incomplete.
MARKER_FIELDS: dict[str, type] = {"files": dict, "world_size": int, "zero_stage": int, "client_keys": list}
_JSON_KINDS = {dict: "an object", int: "an integer", list: "a list"}


def step_tag(step: int) -> str:
    """The DeepSpeed tag of a step's checkpoint: ``step_00000042``."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    return f"step_{step:08d}"


@dataclass(frozen=True)
class CheckpointRef:
    """A complete, verified checkpoint: ``root/tag`` with its parsed completion marker."""

    root: Path
    tag: str
    step: int
    marker: dict

    @property
    def path(self) -> Path:
        return self.root / self.tag


# ------------------------------------------------------------------------------------- manifest


def list_files(folder: Path) -> list[str]:
    """Relative paths of every file under ``folder`` except the marker, sorted."""
    out = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return sorted(name for name in out if name != MARKER_NAME)


def read_marker(tag_dir: Path) -> tuple[dict | None, str]:
    """(marker, "") if ``tag_dir`` holds a completion marker of the shape ``save_checkpoint`` writes, else
    (None, reason). A marker that is not JSON, or JSON of another shape (``[1, 2]``, no ``world_size``, a file entry
    without its size), makes the folder incomplete like a missing one: callers skip it, nothing raises."""
    marker_path = Path(tag_dir) / MARKER_NAME
    if not marker_path.is_file():
        return None, f"no completion marker {MARKER_NAME} (save interrupted or not an ar2diff checkpoint)"
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        return None, f"unreadable completion marker {marker_path}: {err}"
    problem = marker_shape_problem(marker)
    if problem:
        return None, f"malformed completion marker {marker_path}: {problem}"
    return marker, ""


def marker_shape_problem(marker) -> str:
    """'' if ``marker`` (parsed JSON) has every field resume and export read, with its JSON type; else what is off."""
    if not isinstance(marker, dict):
        return f"a JSON {type(marker).__name__}, not an object"
    for key, kind in MARKER_FIELDS.items():
        value = marker.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            found = "missing" if key not in marker else repr(value)[:40]
            return f"{key!r} is {found}, expected {_JSON_KINDS[kind]}"
    if not all(isinstance(key, str) for key in marker["client_keys"]):
        return "'client_keys' is not a list of names"
    for name, entry in marker["files"].items():
        size = entry.get("size") if isinstance(entry, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return f"the entry of file {name!r} has no byte size"
        if not isinstance(entry.get("sha256"), (str, type(None))):
            return f"the sha256 of file {name!r} is not a string"
    return ""


def check_manifest(tag_dir: Path, verify: Verify = "size") -> tuple[dict | None, str]:
    """(marker, "") if ``tag_dir`` holds a well-formed completion marker whose manifest matches the files on disk,
    else (None, reason). ``verify="hash"`` also re-hashes every file (slow on big checkpoints)."""
    marker, reason = read_marker(tag_dir)
    if marker is None:
        return None, reason
    for name, entry in marker["files"].items():
        path = Path(tag_dir) / name
        if not path.is_file():
            return None, f"file {name} listed in the manifest is missing"
        if path.stat().st_size != entry["size"]:
            return None, f"file {name} has {path.stat().st_size} bytes, manifest says {entry['size']}"
        if verify == "hash" and entry.get("sha256") and sha256_file(path) != entry["sha256"]:
            return None, f"file {name} does not match its sha256 in the manifest"
    return marker, ""


# ---------------------------------------------------------------------------------- find / resolve


def step_dirs(root: Path) -> list[tuple[int, str]]:
    """(step, tag) of every ``step_XXXXXXXX`` folder under root, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in root.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name))]
    return sorted(found, reverse=True)


def find_latest_complete(ckpt_root: str | os.PathLike, *, verify: Verify = "size") -> CheckpointRef | None:
    """The newest checkpoint under ``ckpt_root`` whose marker is present and whose manifest matches its
    files; None if there is none (or the folder does not exist). Partial folders are never considered."""
    return scan_checkpoints(ckpt_root, verify=verify)[0]


def scan_checkpoints(ckpt_root: str | os.PathLike, *, verify: Verify = "size") -> tuple[CheckpointRef | None, dict]:
    """(the newest complete checkpoint or None, {tag: reason} of the folders newer than it that hold a completion
    marker but fail the check). Folders without a marker (a save killed before its end) are skipped with a warning
    but never counted as failed: with no complete checkpoint and no failure, a run starts fresh."""
    root = Path(ckpt_root)
    failed: dict[str, str] = {}
    for step, tag in step_dirs(root):
        marker, reason = check_manifest(root / tag, verify)
        if marker is not None:
            return CheckpointRef(root=root, tag=tag, step=step, marker=marker), failed
        log.warning("skipping checkpoint %s: %s", root / tag, reason)
        if (root / tag / MARKER_NAME).exists():
            failed[tag] = reason
    return None, failed


class NoVerifiedCheckpoint(ValueError):
    """Every step folder that was once complete (it holds a completion marker) fails its check.

    Starting from step 0 would silently retrain and overwrite them, so resume refuses (``trainer.start_over=true``
    trains from step 0 on purpose)."""

    @classmethod
    def naming(cls, root: Path, failed: dict[str, str]) -> NoVerifiedCheckpoint:
        """The one-line error naming ``root``'s failed folders (``failed``: tag -> why) and what to do."""
        failed = dict(sorted(failed.items(), reverse=True))  # newest first
        shown = "; ".join(f"{tag}: {reason}" for tag, reason in list(failed.items())[:4])
        more = f"; and {len(failed) - 4} more" if len(failed) > 4 else ""
        return cls(f"no checkpoint under {root} passes its check ({shown}{more}): resuming would start from step 0 "
                   f"and overwrite {', '.join(failed)}. Restore the named files (or move those folders away), or "
                   "set trainer.start_over=true to train from step 0 anyway")


def resolve_checkpoint(path: str | os.PathLike, tag: str | None = None, *, verify: Verify = "size") -> CheckpointRef:
    """A complete checkpoint from a checkpoint root (newest complete one, or ``tag``) or from a tag
    folder itself. Raises FileNotFoundError / ValueError that name the path and what is wrong."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"checkpoint path {path} is a file; pass a checkpoint root or a step_XXXXXXXX folder")
    is_tag_dir = (path / MARKER_NAME).exists() or TAG_RE.match(path.name) or path.name.endswith(PARTIAL_SUFFIX)
    if is_tag_dir and tag is None:
        root, tag = path.parent, path.name
    else:
        root = path
    if tag is not None:
        match = TAG_RE.match(tag)
        marker, reason = check_manifest(root / tag, verify) if (root / tag).is_dir() else (None, "no such folder")
        if marker is None or match is None:
            reason = reason or "not a step_XXXXXXXX tag"
            raise ValueError(f"checkpoint {root / tag} is not a complete ar2diff checkpoint: {reason}")
        return CheckpointRef(root=root, tag=tag, step=int(match.group(1)), marker=marker)
    ref = find_latest_complete(root, verify=verify)
    if ref is None:
        present = sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))
        raise ValueError(f"no complete checkpoint under {root} (step folders present: {present or 'none'}); "
                         f"half-written saves lack {MARKER_NAME} and are never used")
    return ref
