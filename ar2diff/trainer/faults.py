"""Loop-level fault handling: a guard against non-finite steps and a preemption signal that stops at a step boundary.

Both are plain objects the training loop asks once per optimizer step, so they work the same inside today's
`train_phase` and as PhaseTrainer callbacks:

- `NonFiniteGuard.check(...)` after each optimizer step: a non-finite loss or gradient norm stops the run with an
  error naming the step, the data position and the loss terms; up to `max_skips` such steps may be skipped instead,
  but only when the optimizer really dropped the update (DeepSpeed's ZeRO optimizers skip a step whose gradient
  norm is inf/NaN; without ZeRO the update is applied and the weights are already poisoned, so the run stops).
- `StopSignal`: SIGTERM, SIGUSR1 and SIGINT (what schedulers send before preemption) set a flag; `should_stop()`
  all-reduces it at a step boundary so every rank stops at the same step even when only some were signalled. The
  loop then saves a checkpoint and exits 0, and the same command resumes. A second signal exits at once, except a
  repeat of the same signal within `FORWARD_WINDOW_S` of the first: that is one stop reaching a rank twice (a
  scheduler signals every process of the job, and the launcher, torchrun or deepspeed's, forwards its own copy to
  each rank), and it must not turn a clean stop into a kill that loses the checkpoint. Inside an
  `interruptible()` section (set-up, the decoder check: work that holds nothing half-written and can take minutes)
  the signal raises `StopRequested` at once instead. `process_stop()` is the one instance of the process: the
  command line installs it at start, so a signal is honoured from process start to exit.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# A repeat of the first stop signal this soon after it is the same request arriving again (the launcher's forwarded
# copy comes within its monitor interval: 0.1 s for torchrun, at once for deepspeed's), not a second request.
FORWARD_WINDOW_S = 5.0


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
    second one ends the process at once with 128 + signal number, the shell's convention for death by signal, unless
    it is the same signal within `forward_window_s` of the first (the launcher forwarding the same stop: ignored).
    """

    def __init__(self, signals=STOP_SIGNALS, forward_window_s: float = FORWARD_WINDOW_S):
        self.signals = tuple(signals)
        self.forward_window_s = forward_window_s
        self.received: int | None = None
        self._received_at = 0.0
        self._previous: dict = {}
        self._installed = 0
        self._interruptible = 0

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            if signum == self.received and time.monotonic() - self._received_at < self.forward_window_s:
                return  # the same stop again (forwarded by the launcher): keep stopping cleanly
            os._exit(128 + signum)
        self.received, self._received_at = signum, time.monotonic()
        if self._interruptible:
            log.warning("received %s: stopping now (send it again %g s on to exit at once)", signal.Signals(signum).name,
                        self.forward_window_s)
            raise StopRequested(self.name)
        log.warning("received %s: stopping at the next step boundary after a checkpoint (send it again %g s on to "
                    "exit now)", signal.Signals(signum).name, self.forward_window_s)

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


# Word a rank leaves in the rendezvous store (torchrun's agent, or rank 0 under an env:// launch) when it ends on
# purpose: a peer whose collective breaks as it exits can then tell a stop or an error (word left) from a rank
# that died or hung (none).
EXIT_WORD = "ar2diff/exit/{rank}"
STORE_WAIT = timedelta(seconds=10)


def _store():
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return distributed_c10d._get_default_store()


def leave_exit_word(kind: str) -> None:
    """Record that this rank ends on purpose (`kind`: "stopped", "error"); best effort, it is on the way out."""
    try:
        if (store := _store()) is not None:
            store.set_timeout(STORE_WAIT)
            store.set(EXIT_WORD.format(rank=dist.get_rank()), kind)
    except Exception:  # the store's host is gone: nobody is left to read the word
        pass


def silent_peers() -> list[int] | None:
    """The other ranks that left no exit word: dead (killed, out of memory, crashed) or hung. None when there are
    no peers or the store cannot be read (its host is gone too)."""
    try:
        if (store := _store()) is None:
            return None
        store.set_timeout(STORE_WAIT)
        me = dist.get_rank()
        return [r for r in range(dist.get_world_size()) if r != me and not store.check([EXIT_WORD.format(rank=r)])]
    except Exception:
        return None
