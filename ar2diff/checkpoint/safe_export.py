"""Guards around writing an export: where it may go and what it may contain.

- `check_destination`: an export may replace (``--overwrite``) only a folder that is itself a complete ar2diff
  export. A file, a run folder, a checkpoint folder, or any folder holding one of them is refused, so no command
  deletes a run. Nothing is deleted by the check itself.
- `check_finite`: a model with inf/NaN weights (a diverged run) is never exported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ar2diff.export_format import EXPORT_MARKER_NAME, METADATA_NAME

# What marks a folder as part of a run: checkpoint roots, step folders, the run lock, the trainer's records.
RUN_MARKERS = ("checkpoints", "latest", "ar2diff_complete.json", ".ar2diff.lock", "resolved_config.json",
               "pipeline.json")


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def check_destination(dest: str | os.PathLike, overwrite: bool, protect: Iterable[str | os.PathLike] = ()) -> None:
    """Raise (FileExistsError / ValueError naming the path) unless writing an export at `dest` is safe.

    `protect`: folders that must survive (the checkpoint being exported); `dest` may not be one of them nor hold
    one. An existing `dest` is replaced only with `overwrite` and only when it is a complete ar2diff export with
    no subfolder (a run or checkpoint folder has subfolders; an export has none).
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"export destination {dest} is a file, not a folder; choose a folder path for --out")
    resolved = dest.resolve()
    for folder in protect:
        folder = Path(folder).resolve()
        if _is_within(folder, resolved):
            raise ValueError(f"export destination {dest} is or contains the checkpoint folder {folder}; exporting "
                             "there would delete the run. Choose a new --out folder (e.g. RUN/export)")
    if not dest.exists():
        return
    if not overwrite:
        raise FileExistsError(f"export destination {dest} exists; remove it or pass --overwrite (overwrite=True)")
    found = [name for name in RUN_MARKERS if (dest / name).exists()]
    if found:
        raise ValueError(f"export destination {dest} holds {found[0]}: it is a run or checkpoint folder, not an "
                         "export. --overwrite only replaces a complete ar2diff export; choose a new --out folder")
    if not ((dest / METADATA_NAME).is_file() and (dest / EXPORT_MARKER_NAME).is_file()):
        raise ValueError(f"export destination {dest} is not a complete ar2diff export (no {METADATA_NAME} and "
                         f"{EXPORT_MARKER_NAME}); --overwrite only replaces an export. Choose a new --out folder")
    subfolders = sorted(p.name for p in dest.iterdir() if p.is_dir())
    if subfolders:
        raise ValueError(f"export destination {dest} has subfolders {subfolders[:3]} an export never has; "
                         "--overwrite refuses to delete them. Choose a new --out folder")


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str = "the model") -> None:
    """Raise ValueError naming the tensors of `state_dict` that hold inf or NaN."""
    bad = [name for name, t in state_dict.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ValueError(f"refusing to export {source}: non-finite (inf/NaN) weights in {shown}; the run diverged. "
                         "Export an earlier checkpoint (python -m ar2diff.export --tag step_...)")
