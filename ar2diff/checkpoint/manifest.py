"""What makes a checkpoint folder complete, read without DeepSpeed: names, the completion marker, lookup.

A step folder ``step_XXXXXXXX`` is complete when it holds ``ar2diff_complete.json`` whose manifest (size and sha256
of every file) matches the files on disk. ``find_latest_complete`` and ``resolve_checkpoint`` only ever return such a
folder; half-written saves (``.partial``, or no marker) are never used. The save itself is in ``resume``.
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

Verify = Literal["size", "hash"]


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


def check_manifest(tag_dir: Path, verify: Verify = "size") -> tuple[dict | None, str]:
    """(marker, "") if ``tag_dir`` holds a completion marker whose manifest matches the files on disk,
    else (None, reason). ``verify="hash"`` also re-hashes every file (slow on big checkpoints)."""
    marker_path = Path(tag_dir) / MARKER_NAME
    if not marker_path.is_file():
        return None, f"no completion marker {MARKER_NAME} (save interrupted or not an ar2diff checkpoint)"
    try:
        marker = json.loads(marker_path.read_text())
        files = marker["files"]
    except (ValueError, KeyError) as err:
        return None, f"unreadable completion marker {marker_path}: {err}"
    for name, entry in files.items():
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
    root = Path(ckpt_root)
    for step, tag in step_dirs(root):
        marker, reason = check_manifest(root / tag, verify)
        if marker is not None:
            return CheckpointRef(root=root, tag=tag, step=step, marker=marker)
        log.warning("skipping checkpoint %s: %s", root / tag, reason)
    return None


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
