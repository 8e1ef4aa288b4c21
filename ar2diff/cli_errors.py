"""One line per user-facing error, printed once (by global rank 0), no traceback.

The command-line entry points catch the errors a user can cause (a config value, a file, a busy run folder, a full
disk, a diverged run) and hand them here; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

from ar2diff.checkpoint.integrity import DiskFull
from ar2diff.trainer.faults import NonFiniteError
from ar2diff.trainer.run_lock import RunLocked

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, DiskFull, RunLocked, NonFiniteError)


def one_line(err: BaseException) -> str:
    """The error's message on one line (a DiskFull keeps only its text, not the '[Errno 28]' prefix)."""
    text = err.strerror if isinstance(err, DiskFull) and err.strerror else str(err)
    return " ".join(text.split())


def report(prog: str, err: BaseException, rank: int | None = None) -> int:
    """Print `prog: error: <one line>` to stderr on rank 0 and return the exit status (1)."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if rank == 0:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
    return 1
