"""Fault handling as `PhaseTrainer` callbacks (the rules themselves are in trainer/faults.py).

- `NonFiniteStop`: after every optimizer step, a non-finite loss or gradient norm stops the phase with the step,
  the data position and the loss terms (or is skipped, at most `trainer.max_nonfinite_skips` times, when the
  optimizer dropped it).
- `PreemptionStop`: SIGTERM/SIGUSR1/SIGINT ask for a checkpoint at the next step boundary and a clean stop; every
  rank takes the same decision (an all-reduce in `StopSignal.should_stop`), so all stop at the same step.
"""

from __future__ import annotations

from ar2diff.trainer.callbacks import Callback, TrainState
from ar2diff.trainer.faults import NonFiniteGuard, StopSignal
from ar2diff.model.sequence_shard import reduce_logged
from ar2diff.trainer.standard_callbacks import mean_over_ranks


class NonFiniteStop(Callback):
    order = -15  # after the metrics of the step, before any checkpoint of it

    def __init__(self, max_skips: int):
        self.guard = NonFiniteGuard(max_skips)
        self.sums: dict[str, float] = {}
        self.position: dict = {}

    def _start_step(self, state: TrainState) -> None:
        self.sums, self.position = {}, {"epoch": state.data.train.epoch, "step": state.data.train.step}

    def on_phase_start(self, state: TrainState) -> None:
        self._start_step(state)

    def on_micro_step_end(self, state: TrainState, out) -> None:
        for k, v in out.terms.log_dict().items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) / state.budget.grad_accum_steps

    def on_step_end(self, state: TrainState) -> None:
        terms = mean_over_ranks(reduce_logged(self.sums, state.objective.sequence_parallel, state.device),
                                 state.device)
        self.guard.check(state.step, terms, state.engine.get_global_grad_norm(), state.engine.was_step_applied(),
                         self.position)
        self._start_step(state)


class PreemptionStop(Callback):
    """Reads the trainer's `StopSignal` at every step boundary before the last; the trainer checkpoints and stops.
    (After the last step the trainer itself reads the signal between the steps of the phase's end.)"""

    order = 5

    def __init__(self, signal: StopSignal):
        self.signal = signal

    def on_step_end(self, state: TrainState) -> None:
        if state.step < state.budget.steps and self.signal.should_stop(state.device):
            state.should_stop = True
            state.stopped_by = self.signal.name
