"""A lock on a run folder so that two jobs never train into the same checkpoints.

`RUN_DIR/.ar2diff.lock` is created with O_CREAT|O_EXCL (atomic on local filesystems and on NFSv3+/Lustre/GPFS) and
holds the owner's host, pid, boot id and start time. While the job runs it also holds an fcntl lock on that file:
the kernel (or the NFS lock manager, whose leases expire with a dead client) drops it when the process dies, even by
SIGKILL. A second job that finds the file therefore decides:

- fcntl lock still held by someone -> the owner is alive: refused, naming host and pid;
- fcntl lock free (or fcntl unsupported on this filesystem) -> it falls back to the recorded owner: on this host,
  a pid that is gone or a different boot id means the owner is dead; on another host, the free fcntl lock says so;
- a stale lock is taken over (rewritten with this job's identity) with a warning.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

from ar2diff.fs import pid_alive

try:
    import fcntl
except ImportError:  # not on every platform; the host/pid/boot check still works
    fcntl = None

log = logging.getLogger(__name__)

LOCK_NAME = ".ar2diff.lock"


class RunLocked(RuntimeError):
    """Another live job holds the run folder."""


def boot_id() -> str:
    """This machine's boot id (changes on reboot, so a pid from before a reboot is never mistaken for a live one)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _identity() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": boot_id(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _try_fcntl(fd: int) -> bool | None:
    """True: we now hold the fcntl lock; False: someone else holds it; None: the filesystem cannot tell."""
    if fcntl is None:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EAGAIN):
            return False
        return None  # ENOLCK / EINVAL: no lock manager here


def owner_alive(owner: dict, fcntl_state: bool | None) -> bool:
    """Whether the recorded `owner` still runs, given what the fcntl lock said (pure apart from a pid probe)."""
    if fcntl_state is False:
        return True
    if owner.get("host") == socket.gethostname():
        if owner.get("boot_id") and owner.get("boot_id") != boot_id():
            return False
        return owner.get("pid") != os.getpid() and pid_alive(int(owner.get("pid", -1)))
    return fcntl_state is None  # another host: only a free fcntl lock proves it dead


class RunLock:
    """`with RunLock(run_dir):` holds the run folder for this process; raises RunLocked if a live job has it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a peer may remove a stale file between our checks: retry a few times
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                if self._take_over_stale():
                    return self
                continue
            _try_fcntl(fd)
            self._write(fd)
            return self
        raise RunLocked(f"could not lock {self.path}: it keeps changing; is another job starting in this run_dir?")

    def _take_over_stale(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return False
        state = _try_fcntl(fd)
        try:
            owner = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
        except ValueError:
            owner = {}
        if owner and owner_alive(owner, state):
            os.close(fd)
            raise RunLocked(f"run folder {self.path.parent} is in use by pid {owner.get('pid')} on "
                            f"{owner.get('host')} (since {owner.get('started')}); wait for it, or choose another "
                            f"run_dir. If that job is dead, delete {self.path}")
        log.warning("taking over the stale lock %s of %s", self.path, owner or "an unreadable owner")
        self._write(fd)
        return True

    def _write(self, fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_identity()).encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing drops the fcntl lock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class _NoLock:
    def release(self) -> None:
        pass


def lock_run_dir(run_dir: str | os.PathLike, rank: int = 0):
    """Rank 0 takes the run folder's lock and every rank learns the outcome, so a refused job stops on all ranks
    (RunLocked everywhere). Returns an object with `release()` (a no-op on other ranks)."""
    lock, error = (_NoLock(), None)
    if rank == 0:
        try:
            lock = RunLock(run_dir).acquire()
        except RunLocked as err:
            error = str(err)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise RunLocked(error)
    return lock
