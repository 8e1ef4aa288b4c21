"""The filesystem layer everything else writes through: atomic writes and one-line disk-full errors.

- Atomic writes: readers (a resuming run, a notebook, a second rank) see the old file or the new one, never a
  half-written one. Write to a hidden temporary next to the target, optionally fsync, then `os.replace`.
- `atomic_folder`: the same for a folder (an export, run assets, a fetched base); `make_world_readable` gives a
  finished folder the permissions of the rest of the run instead of the 0600 of temporary files.
- `DiskFull` / `disk_full_error`: a save that fails with ENOSPC (or the C++ stream error torch.save raises when the
  disk fills) becomes one line naming the folder and the space left, after the partial save is removed.
- Temporary names (`temporary_name`) carry their writer's pid, boot id, pid namespace and host, so a temporary that a
  killed process left (an export, a data cache folder: gigabytes) is recognised and removed at the next start
  (`remove_stale_temporaries`); one whose writer may still run, or runs on another host, is never touched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex), read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 23), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ temporary names

UNKNOWN_BOOT = "unknown"
_TEMPORARY = re.compile(r"(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<boot>[0-9a-f]{12}|unknown)-(?P<ns>\d+)"
                        r"(?:-[0-9a-f]{8})?@(?P<host>[A-Za-z0-9._-]+)")


@lru_cache(maxsize=1)
def boot_id() -> str:
    """12 hex digits of this machine's boot id (it changes on every reboot, so a pid recorded before a reboot is
    never mistaken for a live process), or "unknown" where the kernel does not say (then only the pid is probed)."""
    try:
        text = Path("/proc/sys/kernel/random/boot_id").read_text()
    except OSError:
        return UNKNOWN_BOOT
    digits = re.sub(r"[^0-9a-f]", "", text.lower())
    return digits[:12] if len(digits) >= 12 else UNKNOWN_BOOT


def pid_namespace() -> str:
    """The inode of this process's pid namespace ("0" where there is none to read). Containers on one host share its
    name and boot id but not their pids: a pid is probed only from the namespace that wrote it."""
    try:
        return re.sub(r"\D", "", os.readlink("/proc/self/ns/pid")) or "0"
    except OSError:
        return "0"


def host_name() -> str:
    """This host's name as it may appear in a file name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def temporary_name(name: str, kind: str = "tmp", unique: bool = False) -> str:
    """`<name>.<kind>-<pid>-<boot id>-<pid namespace>[-<8 hex>]@<host>`: a temporary that says who wrote it, so
    `remove_stale_temporaries` can tell a leftover of a dead process from one still being written. `unique` adds a
    random part, for a process that writes several temporaries of one name at once. `kind` is "tmp" or "old"."""
    extra = f"-{uuid.uuid4().hex[:8]}" if unique else ""
    return f"{name}.{kind}-{os.getpid()}-{boot_id()}-{pid_namespace()}{extra}@{host_name()}"


@dataclass(frozen=True)
class TemporaryOwner:
    """Who wrote a temporary, read back from its name."""

    name: str
    kind: str
    pid: int
    boot: str
    namespace: str
    host: str


def temporary_owner(entry: str) -> TemporaryOwner | None:
    """The writer recorded in a name made by `temporary_name`, or None for any other name."""
    m = _TEMPORARY.fullmatch(entry)
    if m is None:
        return None
    return TemporaryOwner(m["name"], m["kind"], int(m["pid"]), m["boot"], m["ns"], m["host"])


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists here (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_gone(owner: TemporaryOwner) -> bool:
    """True only when the writer surely no longer runs: it ran on this host, and either in an earlier boot, or in
    this boot and this pid namespace with a pid that no longer exists. Another host's, another container's or an
    unreadable owner is assumed alive: a shared filesystem cannot probe their pids."""
    if owner.host != host_name():
        return False
    boot = boot_id()
    if owner.boot != UNKNOWN_BOOT and boot != UNKNOWN_BOOT and owner.boot != boot:
        return True  # a process of the previous boot
    if owner.namespace != pid_namespace():
        return False
    return owner.pid != os.getpid() and not pid_alive(owner.pid)


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporaries (files or folders named by `temporary_name`, of `name` only when given) in `folder`
    whose writer is gone (`owner_gone`); return what was removed. Safe while other processes write there: a
    temporary of a live writer, of another host or of an unrecognised name is left alone."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no folder yet: nothing left over
        return removed
    for entry in entries:
        owner = temporary_owner(entry.name)
        if owner is None or (name is not None and owner.name != name) or not owner_gone(owner):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if not os.path.lexists(path):
            log.warning("removed %s, left by process %d of this host, which is gone", path, owner.pid)
            removed.append(path)
    return removed


# ------------------------------------------------------------------------------------------ atomic writes


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` (fsynced first when `fsync`). Temporaries of
    `path` that a killed process left are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, f".{path.name}")
    tmp = path.with_name(temporary_name(f".{path.name}"))
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
    never leaves a folder that looks complete): at no moment does an incomplete folder sit at `dest`. What a killed
    process left beside `dest` (`<dest>.tmp-…`, `<dest>.old-…`: an export is gigabytes) is removed first; a
    leftover of a live process, or of another host, is kept (`remove_stale_temporaries`)."""
    dest = Path(dest)
    remove_stale_temporaries(dest.parent, dest.name)
    tmp = dest.with_name(temporary_name(dest.name))
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if dest.exists():
            old = dest.with_name(temporary_name(dest.name, kind="old"))
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
    """ENOSPC/EDQUOT (also an OSError that only says so in its text, as pyarrow's writers raise it), or torch.save's
    stream error on a filesystem with (almost) no space left."""
    if isinstance(err, OSError) and (err.errno in (errno.ENOSPC, errno.EDQUOT)
                                     or any(os.strerror(e) in str(err) for e in (errno.ENOSPC, errno.EDQUOT))):
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
