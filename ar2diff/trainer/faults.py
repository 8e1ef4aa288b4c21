"""Loop-level fault handling: a guard against non-finite steps and a preemption signal that stops at a step boundary.

Both are plain objects the training loop asks once per optimizer step, so they work the same inside today's
`train_phase` and as PhaseTrainer callbacks:

- `NonFiniteGuard.check(...)` after each optimizer step: a non-finite loss or gradient norm stops the run with an
  error naming the step, the data position and the loss terms; up to `max_skips` such steps may be skipped instead,
  but only when the optimizer really dropped the update (DeepSpeed's ZeRO optimizers skip a step whose gradient
  norm is inf/NaN; without ZeRO the update is applied and the weights are already poisoned, so the run stops).
- `StopSignal`: SIGTERM, SIGUSR1 and SIGINT (what schedulers send before preemption) set a flag; `should_stop()`
  all-reduces it at a step boundary so every rank stops at the same step even when only some were signalled. The
  loop then saves a checkpoint and exits 0, and the same command resumes. A second signal exits at once. Inside an
  `interruptible()` section (set-up, the decoder check: work that holds nothing half-written and can take minutes)
  the signal raises `StopRequested` at once instead. `process_stop()` is the one instance of the process: the
  command line installs it at start, so a signal is honoured from process start to exit.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class NonFiniteError(RuntimeError):
    """A training step produced a non-finite loss or gradient norm beyond the allowed skips."""


class StopRequested(Exception):
    """A stop signal arrived inside an interruptible section: the section is abandoned, nothing half-written."""

    def __init__(self, signal_name: str):
        super().__init__(f"stopped by {signal_name}")
        self.signal_name = signal_name


class Preempted(Exception):
    """Raised after the checkpoint of a signalled stop is written; the command exits 0 and resumes when re-run."""

    def __init__(self, step: int, signal_name: str, message: str | None = None):
        super().__init__(message or f"stopped by {signal_name} at step {step}; checkpoint saved, re-run the same "
                         "command to resume")
        self.step, self.signal_name = step, signal_name


def _all_finite(values) -> bool:
    return all(v is None or math.isfinite(float(v)) for v in values)


@dataclass
class NonFiniteGuard:
    """Stops (or, up to `max_skips` times, skips) optimizer steps whose loss or gradient norm is not finite.

    `terms` must be the same on every rank (mean over ranks) and `grad_norm` is DeepSpeed's global norm, so every
    rank takes the same decision without another collective.
    """

    max_skips: int = 0
    skipped: list[int] = field(default_factory=list)

    def check(self, step: int, terms: dict[str, float], grad_norm: float | None, step_applied: bool,
              data_position: dict) -> bool:
        """True if the step was healthy; False if it was skipped; raises NonFiniteError otherwise."""
        if _all_finite(terms.values()) and _all_finite([grad_norm]):
            return True
        shown = ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(terms.items()))
        where = (f"non-finite training step {step} (data position epoch={data_position.get('epoch')} "
                 f"step={data_position.get('step')}): {shown}, grad_norm={grad_norm}")
        if step_applied:
            raise NonFiniteError(f"{where}; the optimizer applied it, so the weights are no longer finite. "
                                 "Lower schedule.lr or check the data, then resume from the last checkpoint")
        if len(self.skipped) >= self.max_skips:
            raise NonFiniteError(f"{where}; {len(self.skipped)} such step(s) skipped already, "
                                 f"trainer.max_nonfinite_skips={self.max_skips}. Lower schedule.lr or check the data")
        self.skipped.append(step)
        log.warning("%s; update skipped (%d of trainer.max_nonfinite_skips=%d)", where, len(self.skipped),
                    self.max_skips)
        return False


class StopSignal:
    """Catches SIGTERM/SIGUSR1/SIGINT while installed; `should_stop()` is the all-rank decision at a step boundary.

    Use as a context manager (or install/uninstall, which nest: the outermost pair owns the handlers, so the command
    line can install it at start and a trainer inside again); the previous handlers come back at the outermost
    exit. The first signal only sets a flag, except inside `interruptible()`, where it raises `StopRequested`; a
    second one ends the process at once with 128 + signal number, the shell's convention for death by signal.
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict = {}
        self._installed = 0
        self._interruptible = 0

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signum
        if self._interruptible:
            log.warning("received %s: stopping now (send again to exit at once)", signal.Signals(signum).name)
            raise StopRequested(self.name)
        log.warning("received %s: stopping at the next step boundary after a checkpoint (send again to exit now)",
                    signal.Signals(signum).name)

    def install(self) -> "StopSignal":
        """Catch the stop signals from now on (main thread only); returns self. A fresh outermost install forgets a
        signal an earlier, finished use received."""
        if self._installed == 0:
            self.received = None
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        self._installed += 1
        return self

    def uninstall(self) -> None:
        """Give the signals back to the handlers they had before the outermost `install`."""
        self._installed = max(0, self._installed - 1)
        if self._installed == 0:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
            self._previous.clear()

    def __enter__(self) -> "StopSignal":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A section a signal may abandon at once: raises `StopRequested` on entry if a signal came already, and
        from the handler while inside."""
        if self.received is not None:
            raise StopRequested(self.name)
        self._interruptible += 1
        try:
            yield
        finally:
            self._interruptible -= 1

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "signal"

    def should_stop(self, device=None, group=None) -> bool:
        """Whether any rank got a signal (a MAX all-reduce over `group`, default the world; call it on every rank at
        the same point)."""
        flag = 0 if self.received is None else int(self.received)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([flag], dtype=torch.int64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            flag = int(t.item())
            if flag and self.received is None:
                self.received = flag  # a peer was signalled: stop here too, under the peer's signal name
        return flag != 0


_PROCESS_STOP = StopSignal()


def process_stop() -> StopSignal:
    """The process's stop signal: what the command line installs at start and every trainer of the process uses."""
    return _PROCESS_STOP
