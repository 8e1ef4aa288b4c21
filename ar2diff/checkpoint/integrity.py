"""Checks that a checkpoint is whole before it is resumed from or exported.

- `pick_verified_checkpoint`: the newest complete checkpoint whose files still match the sha256 recorded in its
  completion marker. The files are hashed by all ranks in parallel (a share each) and the verdict is all-gathered,
  so every rank resumes from the same checkpoint. A mismatch (a file corrupted in place, same size) falls back to
  the previous complete checkpoint with a warning naming the file. When no checkpoint passes although some were
  complete once (they hold a completion marker), resume refuses (`NoVerifiedCheckpoint`) rather than train from
  step 0 over them, unless the run asks to start over; a run whose only save was killed before its marker starts
  fresh as before.
- `check_checkpoint_files`: the same hash check on one process, for `python -m ar2diff.export`: a checkpoint whose
  files changed since the save is refused, naming the file, instead of exported.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ar2diff.checkpoint.coordination import all_gather_object, run_on_rank0
from ar2diff.checkpoint.manifest import (
    MARKER_NAME,
    CheckpointRef,
    NoVerifiedCheckpoint,
    check_manifest,
    step_dirs,
)
from ar2diff.export_format import sha256_files

log = logging.getLogger(__name__)


def hash_mismatches(tag_dir: Path, files: dict, names: list[str]) -> list[str]:
    """Those of ``names`` (entries of a marker's ``files``) whose bytes no longer match their recorded sha256, or
    that are gone. Files saved without a hash (``save_checkpoint(hash_files=False)``) are not checked."""
    checked = [name for name in names if files[name].get("sha256")]
    actual = sha256_files([tag_dir / name for name in checked])
    return [name for name, digest in zip(checked, actual) if digest != files[name]["sha256"]]


def describe_mismatch(tag_dir: Path, bad: list[str]) -> str:
    """'<file>[, <file>...] does/do not match the sha256 in ar2diff_complete.json', at most three files named."""
    shown = ", ".join(str(tag_dir / name) for name in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return f"{shown} {'does' if len(bad) == 1 else 'do'} not match the sha256 in {MARKER_NAME}"


def refuse_or_start_over(root: Path, failed: dict[str, str], start_over: bool) -> None:
    """With no checkpoint to resume from: raise `NoVerifiedCheckpoint` when step folders that were once complete
    (``failed``: tag -> why it fails now) exist, unless ``start_over``; nothing to do when ``failed`` is empty."""
    if not failed:
        return
    if not start_over:
        raise NoVerifiedCheckpoint.naming(root, failed)
    log.warning("no checkpoint under %s passes its check (%s); trainer.start_over=true: training from step 0, "
                "replacing them as this run saves the same steps", root, ", ".join(failed))


def pick_verified_checkpoint(ckpt_root: str | Path, *, start_over: bool = False) -> CheckpointRef | None:
    """The newest complete checkpoint under `ckpt_root` whose files match their stored sha256 (a CheckpointRef),
    or None when the run has none yet (a fresh start). Raises `NoVerifiedCheckpoint` when every checkpoint that has
    a completion marker fails its check, unless `start_over` (then None, with a warning). Collective: call on every
    rank; all ranks get the same answer, or all raise the same error."""
    import deepspeed.comm as dist

    root = Path(ckpt_root)

    def candidates() -> tuple[list[tuple[int, str, dict]], dict[str, str]]:
        """Rank 0: (step, tag, marker) of every folder that passes the size check, newest first, and the reason
        of each folder with a marker that does not."""
        found, failed = [], {}
        for step, tag in step_dirs(root):
            marker, reason = check_manifest(root / tag, "size")
            if marker is not None:
                found.append((step, tag, marker))
                continue
            log.warning("skipping checkpoint %s: %s", root / tag, reason)
            if (root / tag / MARKER_NAME).exists():
                failed[tag] = reason
        return found, failed

    rank, world = dist.get_rank(), dist.get_world_size()
    found, failed = run_on_rank0(candidates)
    for i, (step, tag, marker) in enumerate(found):
        names = sorted(marker["files"])
        mine = hash_mismatches(root / tag, marker["files"], names[rank::world])
        gathered: list = [None] * world
        all_gather_object(gathered, mine)
        bad = sorted(n for part in gathered for n in part)
        if not bad:
            return CheckpointRef(root=root, tag=tag, step=step, marker=marker)
        failed[tag] = describe_mismatch(root / tag, bad)
        if rank == 0:
            then = "falling back to the previous complete checkpoint" if i + 1 < len(found) else "no earlier one is left"
            log.warning("checkpoint %s is corrupted: %s; %s", root / tag, failed[tag], then)
    refuse_or_start_over(root, failed, start_over)
    return None


def check_checkpoint_files(ref: CheckpointRef) -> None:
    """Raise ValueError naming the files of ``ref`` whose sha256 no longer matches its completion marker (one
    process, every file). A checkpoint saved without hashes is exported on its sizes alone, with a warning."""
    files = ref.marker["files"]
    if not any(entry.get("sha256") for entry in files.values()):
        log.warning("checkpoint %s records no sha256 (saved with hash_files=False): only the sizes of its files "
                    "are checked", ref.path)
        return
    bad = sorted(hash_mismatches(ref.path, files, sorted(files)))
    if bad:
        earlier = [tag for step, tag in step_dirs(ref.root) if step < ref.step
                   and check_manifest(ref.root / tag, "size")[0] is not None]
        hint = f" or export an earlier checkpoint (--tag {earlier[0]})" if earlier else " (no earlier checkpoint)"
        raise ValueError(f"checkpoint {ref.path} is corrupted: {describe_mismatch(ref.path, bad)} (changed after the "
                         f"save); restore the file{hint}")
