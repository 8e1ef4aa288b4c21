"""A checkpoint save that fails on some ranks fails on all of them, at once, with the same error.

Why: each rank writes its own files. A rank that ran out of disk (or met any other error) used to raise alone while
the others went on into the next barrier and waited there for the process-group timeout (10 minutes), and each rank
printed its own story. Now every rank's outcome is all-gathered on the coordination group after the writes; if any
rank failed, rank 0 removes the `.partial` folder (everyone is done writing by then; complete checkpoints are never
touched) and every rank raises the same error naming the failed rank(s), the folder and the previous checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import deepspeed.comm as dist

from ar2diff.checkpoint.coordination import run_on_rank0
from ar2diff.checkpoint.manifest import find_latest_complete
from ar2diff.fs import disk_full_error, free_bytes, is_disk_full


def describe_failure(err: Exception, partial_dir: Path) -> dict:
    """What another rank needs to know about this rank's failed write (picklable, small)."""

    return {"rank": dist.get_rank(), "disk_full": is_disk_full(err, partial_dir),
            "errno": err.errno if isinstance(err, OSError) else None,
            "error": " ".join(f"{type(err).__name__}: {err}".split())}


def _abandon_partial(root: Path, partial_dir: Path) -> tuple[str | None, int]:
    """Rank 0, once every rank is done writing: remove the failed save (giving the space back) and name the
    newest complete checkpoint, which the failed save never touched. Returns (its path or None, free bytes)."""

    shutil.rmtree(partial_dir, ignore_errors=True)
    previous = find_latest_complete(root)
    return (str(previous.path) if previous else None), free_bytes(partial_dir)


def agreed_save_error(root: Path, partial_dir: Path, outcomes: list) -> Exception:
    """The same error on every rank for a save that failed on some: DiskFull when every failed rank ran out of space
    (one line for the user), else an OSError (same errno: PermissionError stays one) or a RuntimeError naming each
    failed rank and its error."""

    failed = [o for o in outcomes if o]
    previous, free = run_on_rank0(_abandon_partial, root, partial_dir)
    ranks = [o["rank"] for o in failed] if dist.get_world_size() > 1 else None
    if all(o["disk_full"] for o in failed):
        return disk_full_error(partial_dir, previous, ranks=ranks, free=free)
    keep = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    where = f" on rank {', '.join(str(r) for r in ranks)}" if ranks else ""
    text = f"saving checkpoint {partial_dir} failed{where}: {'; '.join(o['error'] for o in failed)}; {keep}"
    codes = {o["errno"] for o in failed}
    if len(codes) == 1 and None not in codes:
        return OSError(codes.pop(), text)  # errno -> subclass: EACCES gives a PermissionError, as before
    return RuntimeError(text)
