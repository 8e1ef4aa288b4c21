"""One line per user-facing error, printed once (by global rank 0), no traceback.

The command-line entry points catch the errors a user can cause (a config value, a file, a busy run folder, a full
disk, a diverged run) and hand them here; anything else is a bug and keeps its traceback. Hydra's own composition
errors (an unknown key, a missing group option, an override it cannot parse) take the same path through
`hydra_errors_in_one_line`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import torch.distributed as dist
from omegaconf.errors import OmegaConfBaseException

from ar2diff.config.hydra_errors import hydra_error_line  # re-exported: the entry points use it
from ar2diff.fs import DiskFull, disk_full_while_writing, is_disk_full
from ar2diff.trainer.faults import NonFiniteError, StopRequested, process_stop, silent_peers
from ar2diff.trainer.run_lock import RunLocked

RANK0_GRACE_S = 20.0
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, DiskFull, RunLocked, NonFiniteError)


def one_line(err: BaseException) -> str:
    """The error's message on one line (a DiskFull keeps only its text, not the '[Errno 28]' prefix)."""
    text = err.strerror if isinstance(err, DiskFull) and err.strerror else str(err)
    return " ".join(text.split())


def disk_full_anywhere(err: OSError, folder: str | None = None) -> OSError:
    """A full disk met outside a checkpoint save, as a DiskFull naming the file (or, when the OS error names none,
    the run folder `folder`); any other OSError is re-raised."""

    target = err.filename or folder
    if not is_disk_full(err, target):
        raise err
    return disk_full_while_writing(target, under=err.filename is None)


class PeerLost(RuntimeError):
    """A collective failed because another rank died or hung. `silent`: the peers that left no exit word (dead or
    hung), [] when every peer ended on purpose, None when that cannot be told (the store's host is gone)."""

    def __init__(self, message: str, silent: list[int] | None = None):
        super().__init__(message)
        self.silent = silent


COLLECTIVE_MARKS = ("gloo", "nccl", "rccl", "connection closed by peer", "connection reset by peer", "timed out",
                    "broken pipe")


def collective_failure(err: BaseException, cfg=None) -> PeerLost | None:
    """A `PeerLost` naming this rank, the peer(s) that ended or hung without a word and what to check, when `err`
    is a failed collective (a peer died, or hung past trainer.collective_timeout_minutes); None for any other
    error."""
    text = str(err)
    backend_error = getattr(dist, "DistBackendError", ())
    if not (isinstance(err, backend_error) or any(m in text.lower() for m in COLLECTIVE_MARKS)):
        return None
    rank = os.environ.get("RANK", "0")
    silent = silent_peers()
    if silent:
        shown = ", ".join(map(str, silent[:8])) + (f" and {len(silent) - 8} more" if len(silent) > 8 else "")
        peer = f"peer rank{'s' if len(silent) > 1 else ''} {shown}"
    else:
        peer = "a peer rank"
    timeout = getattr(getattr(cfg, "trainer", None), "collective_timeout_minutes", None)
    hung = "timed out" in text.lower() or "timeout" in text.lower()
    what = (f"waited trainer.collective_timeout_minutes={timeout:g} min for {peer}, which never answered (hung: "
            "stopped, swapping, or stuck in I/O)" if hung and timeout is not None else
            f"lost {peer} (it ended without a word: killed, out of memory or crashed; its own log, or the "
            "launcher's summary of the failed rank, says why)")
    first = text.strip().splitlines()[0][:160] if text.strip() else type(err).__name__
    return PeerLost(f"rank {rank}: a collective {what}; check that rank's log and the node it ran on [{first}]",
                    silent)


def report(prog: str, err: BaseException, rank: int | None = None) -> int:
    """Print `prog: error: <one line>` to stderr on rank 0 and return the exit status (1)."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if rank == 0:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun stops every rank as soon as one exits: give rank 0 (which may still be finishing W&B) the time to
        # print the line; once rank 0 exits, torchrun ends this wait too. Still alive after it: rank 0 did not meet
        # this error (a file only this node lacks, say), so this rank says it, or nobody would
        try:
            with process_stop().interruptible():  # torchrun's SIGTERM after rank 0's exit ends the wait, silently
                time.sleep(RANK0_GRACE_S)
        except StopRequested:
            return 1
        print(f"{prog}: error on rank {rank}: {one_line(err)}", file=sys.stderr, flush=True)
    return 1


@contextlib.contextmanager
def hydra_errors_in_one_line(prog: str):
    """Around `@hydra.main`: a composition error exits 1 with one line on rank 0 (other ranks exit 1 silently).

    `@hydra.main` prints its errors itself, over several lines and on every rank, unless HYDRA_FULL_ERROR is set,
    in which case it re-raises them. It is set here so the error reaches us; a user who set HYDRA_FULL_ERROR gets
    Hydra's full traceback as before. Any other exception propagates with its traceback (a bug)."""
    from hydra.errors import HydraException

    if os.environ.get("HYDRA_FULL_ERROR"):
        yield
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except (HydraException, OmegaConfBaseException) as err:
        sys.exit(report(prog, RuntimeError(hydra_error_line(err))))
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
