"""Rank-aware run output: console lines on rank 0, W&B (offline unless configured), and a JSON summary.

One helper so no other module branches on rank or on whether W&B is installed: on ranks > 0, or with tracking off,
the W&B calls go to a no-op stand-in.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from ar2diff.fs import is_disk_full, write_json_atomic


def configure_cli_logging() -> None:
    """Console logging for a command-line run: warnings from every library, ar2diff's own INFO lines.

    A log handler that cannot write (W&B's debug.log sits in the run folder, so a full disk breaks it) drops the
    record instead of printing Python's ~40-line "--- Logging error ---" block per record; the run's own error
    (e.g. the one-line disk-full message) stays the only thing the user reads. This is the setting the logging
    docs recommend for production (`logging.raiseExceptions`)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ar2diff").setLevel(logging.INFO)
    logging.raiseExceptions = False


class _NoRun:
    def log(self, *args, **kwargs):
        pass

    def finish(self, *args, **kwargs):
        pass

    summary: dict = {}


class RunLogger:
    """Console + W&B + `summary.json` for one phase."""

    def __init__(self, run_dir: str | Path, rank: int, name: str, group: str | None, config: dict,
                 wandb_cfg=None):
        self.rank = rank
        self.run_dir = Path(run_dir)
        self.summary: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.t0 = time.time()
        self.run = _NoRun()
        if rank == 0 and wandb_cfg is not None and wandb_cfg.wandb and wandb_cfg.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, mode=wandb_cfg.mode,
                                  group=group, name=name, job_type=name, tags=list(wandb_cfg.tags), config=config,
                                  dir=str(self.run_dir), reinit="finish_previous")

    def print(self, *args) -> None:
        if self.rank == 0:
            print(*args, flush=True)

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        row = {f"{prefix}/{k}": v for k, v in metrics.items()}
        if self.rank != 0:
            return
        self.history.append({"step": step, **row})
        self.run.log(row, step=step)
        shown = "  ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        print(f"[{prefix} step {step}] {shown}", flush=True)

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        if self.rank == 0 and not isinstance(self.run, _NoRun):
            import wandb

            self.run.log({key: wandb.Image(str(path))}, step=step)

    def update_summary(self, values: dict[str, Any]) -> None:
        self.summary.update(values)

    def write_summary(self, path: str | Path) -> None:
        """The same numbers as console and W&B, as JSON next to the checkpoint (rank 0, atomic)."""
        if self.rank != 0:
            return
        data = {**self.summary, "history": self.history, "wall_seconds": time.time() - self.t0}
        write_json_atomic(path, data)
        for k, v in self.summary.items():
            if isinstance(v, (int, float, str)):
                self.run.summary[k] = v

    def finish(self, exit_code: int | None = None) -> None:
        """Finish the W&B run (once; later calls do nothing)."""
        run, self.run = self.run, _NoRun()
        run.finish(exit_code=exit_code)

    def close(self) -> None:
        """After the phase, also after a failure: finish W&B if the phase did not (the run is marked failed). W&B's
        own files sit in the run folder; when the disk is full it cannot write them, and that is not reported a
        second time: the error on its way (e.g. the one-line disk-full message) already says so."""

        if isinstance(self.run, _NoRun):
            return
        try:
            self.finish(exit_code=1)
        except OSError as err:
            if not is_disk_full(err, self.run_dir):
                raise


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
