"""Atomic file writes: readers (a resuming run, a notebook, a second rank) see the old file or the new one, never a
half-written one. Write to a hidden temporary next to the target, optionally fsync, then `os.replace`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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
