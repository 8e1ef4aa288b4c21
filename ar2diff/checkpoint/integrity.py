"""Checks that a checkpoint or an export is whole before it is used, and one-line errors when a save runs out of disk.

- `pick_verified_checkpoint`: the newest complete checkpoint whose files still match the sha256 recorded in its
  completion marker. The files are hashed by all ranks in parallel (a share each) and the verdict is all-gathered,
  so every rank resumes from the same checkpoint. A mismatch (a file corrupted in place, same size) falls back to
  the previous complete checkpoint with a warning naming the file.
- `DiskFull` / `disk_full_error`: a save that fails with ENOSPC (or the C++ stream error torch.save raises when the
  disk fills) becomes one line naming the folder and the space left, after the partial save is removed.
"""

from __future__ import annotations

import errno
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


class DiskFull(OSError):
    """A save ran out of disk space; the previous checkpoint is untouched."""


def _bad_files(tag_dir: Path, files: dict, names: list[str]) -> list[str]:
    from ar2diff.checkpoint.resume import _sha256

    bad = []
    for name in names:
        expected = files[name].get("sha256")
        path = tag_dir / name
        if expected and (not path.is_file() or _sha256(path) != expected):
            bad.append(name)
    return bad


def pick_verified_checkpoint(ckpt_root: str | Path):
    """The newest complete checkpoint under `ckpt_root` whose files match their stored sha256 (a CheckpointRef),
    or None. Collective: call on every rank; all ranks get the same answer."""
    import deepspeed.comm as dist

    from ar2diff.checkpoint.coordination import all_gather_object, run_on_rank0
    from ar2diff.checkpoint.resume import _step_dirs, check_manifest

    root = Path(ckpt_root)

    def candidates() -> list[tuple[int, str, dict]]:
        found = []
        for step, tag in _step_dirs(root):
            marker, reason = check_manifest(root / tag, "size")
            if marker is None:
                log.warning("skipping checkpoint %s: %s", root / tag, reason)
            else:
                found.append((step, tag, marker))
        return found

    from ar2diff.checkpoint.resume import CheckpointRef

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
                        "ar2diff_complete.json")
    return None


def is_disk_full(err: BaseException, folder: str | Path | None = None, min_free: int = 1 << 20) -> bool:
    """ENOSPC/EDQUOT, or torch.save's stream error on a filesystem with (almost) no space left."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    cause = err.__cause__ or err.__context__
    if cause is not None and cause is not err and is_disk_full(cause, folder, min_free):
        return True
    if folder is not None and ("iostream error" in str(err) or "file write failed" in str(err)
                               or "PytorchStreamWriter" in str(err)):
        try:
            return shutil.disk_usage(_existing(Path(folder))).free < min_free
        except OSError:
            return False
    return False


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Free space on the filesystem holding `path` (or its nearest existing parent)."""
    return shutil.disk_usage(_existing(Path(path))).free


def disk_full_error(folder: str | Path, previous: str | None, ranks: list[int] | None = None,
                    free: int | None = None) -> DiskFull:
    """The one-line error for a save into `folder` that ran out of space (on `ranks`, when several ranks save)."""
    folder = Path(folder)
    free = free_bytes(folder) if free is None else free
    on = f" on rank {', '.join(str(r) for r in ranks)}" if ranks else ""
    keep = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    return DiskFull(errno.ENOSPC, f"disk full{on} while saving {folder} ({free:,} bytes free); {keep}. Free space "
                    "(or lower trainer.keep_last) and re-run the same command to resume")


def disk_full_while_writing(path: str | Path | None, under: bool = False) -> DiskFull:
    """The one-line error for a write outside a checkpoint save that ran out of space (`under`: `path` is the
    folder written into, not the file)."""
    where = f" while writing {'under ' if under else ''}{path}" if path else ""
    free = f" ({shutil.disk_usage(_existing(Path(path))).free:,} bytes free)" if path else ""
    return DiskFull(errno.ENOSPC, f"disk full{where}{free}; complete checkpoints are kept. Free space and re-run "
                    "the same command to resume")
