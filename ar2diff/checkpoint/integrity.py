"""Checks that a checkpoint is whole before it is resumed from.

- `pick_verified_checkpoint`: the newest complete checkpoint whose files still match the sha256 recorded in its
  completion marker. The files are hashed by all ranks in parallel (a share each) and the verdict is all-gathered,
  so every rank resumes from the same checkpoint. A mismatch (a file corrupted in place, same size) falls back to
  the previous complete checkpoint with a warning naming the file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ar2diff.checkpoint.coordination import all_gather_object, run_on_rank0
from ar2diff.checkpoint.manifest import MARKER_NAME, CheckpointRef, check_manifest, step_dirs
from ar2diff.fs import sha256_file

log = logging.getLogger(__name__)


def _bad_files(tag_dir: Path, files: dict, names: list[str]) -> list[str]:

    bad = []
    for name in names:
        expected = files[name].get("sha256")
        path = tag_dir / name
        if expected and (not path.is_file() or sha256_file(path) != expected):
            bad.append(name)
    return bad


def pick_verified_checkpoint(ckpt_root: str | Path):
    """The newest complete checkpoint under `ckpt_root` whose files match their stored sha256 (a CheckpointRef),
    or None. Collective: call on every rank; all ranks get the same answer."""
    import deepspeed.comm as dist


    root = Path(ckpt_root)

    def candidates() -> list[tuple[int, str, dict]]:
        found = []
        for step, tag in step_dirs(root):
            marker, reason = check_manifest(root / tag, "size")
            if marker is None:
                log.warning("skipping checkpoint %s: %s", root / tag, reason)
            else:
                found.append((step, tag, marker))
        return found


    rank, world = dist.get_rank(), dist.get_world_size()
    for step, tag, marker in run_on_rank0(candidates):
        names = sorted(marker["files"])
        mine = _bad_files(root / tag, marker["files"], names[rank::world])
        gathered: list = [None] * world
        all_gather_object(gathered, mine)
        bad = sorted(n for part in gathered for n in part)
        if not bad:
            return CheckpointRef(root=root, tag=tag, step=step, marker=marker)
        if rank == 0:
            log.warning("checkpoint %s is corrupted: %s no longer match(es) the sha256 in %s; falling back to the "
                        "previous complete checkpoint", root / tag, ", ".join(str(root / tag / n) for n in bad),
                        MARKER_NAME)
    return None
