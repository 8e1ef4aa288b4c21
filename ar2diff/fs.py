"""The filesystem layer everything else writes through: atomic writes and one-line disk-full errors.

- Atomic writes: readers (a resuming run, a notebook, a second rank) see the old file or the new one, never a
  half-written one. Write to a hidden temporary next to the target, optionally fsync, then `os.replace`.
- `atomic_folder`: the same for a folder (an export, run assets, a fetched base); `make_world_readable` gives a
  finished folder the permissions of the rest of the run instead of the 0600 of temporary files.
- `DiskFull` / `disk_full_error`: a save that fails with ENOSPC (or the C++ stream error torch.save raises when the
  disk fills) becomes one line naming the folder and the space left, after the partial save is removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex), read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 23), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` (fsynced first when `fsync`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str, fsync: bool = False) -> None:
    with atomic_path(path, fsync) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, data: Any, fsync: bool = False, sort_keys: bool = False) -> None:
    """JSON (indented; values JSON cannot hold are written as str) to `path`, atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str, sort_keys=sort_keys), fsync)


@contextmanager
def atomic_folder(dest: str | os.PathLike, marker: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder next to `dest` to fill; on success it replaces `dest`, on failure it is removed.
    An existing `dest` is moved aside first and deleted after (its `marker` file first, so an interrupted deletion
    never leaves a folder that looks complete): at no moment does an incomplete folder sit at `dest`."""
    dest = Path(dest)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if dest.exists():
            old = dest.with_name(f"{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            if marker is not None:
                (old / marker).unlink(missing_ok=True)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def make_world_readable(folder: str | os.PathLike) -> None:
    """Give `folder` and everything in it the permissions new files get under this process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    folder = Path(folder)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


# ------------------------------------------------------------------------------------------ disk full


class DiskFull(OSError):
    """A save ran out of disk space; the previous checkpoint is untouched."""


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
