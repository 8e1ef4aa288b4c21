"""The callback interface of `PhaseTrainer` (trainer/phase.py): what a feature plugs into, and what it can see.

A callback subclasses `Callback` and overrides any of these hooks; each gets the phase's `TrainState`:

- `on_phase_start(state)`: after the engine is built and a checkpoint (if any) restored, before the first step.
  `state.step` is the resumed step.
- `on_batch(state, batch) -> batch`: every micro batch, before the forward; returns the batch to use (e.g.
  sequence-parallel sharding of the sequence dimension, or moving extra fields). Runs in callback order.
- `on_micro_step_end(state, out)`: after each micro batch's backward + engine step; `out` is the objective's
  `TidarOutput` (loss, terms, router logits are not kept).
- `on_step_end(state)`: after each optimizer step (`state.step` already counts it). `state.step_terms` holds the
  LossTerms of this step's micro batches. Set `state.should_save = True` to ask for a checkpoint at this step
  boundary and `state.should_stop = True` to end the phase after it (e.g. a preemption signal, a non-finite loss):
  the checkpoint callback saves, and no export is written for a phase that stopped early.
- `on_save(state, step)`: after a checkpoint of `step` was written (every rank).
- `on_phase_end(state)`: after the last step, in callback order: the final checkpoint, the export, the summary, the
  phase-end decoder check. `state.stopped_early` tells a phase that ended by `should_stop`.
- `on_close(state)`: always last, also after an exception (close progress bars, finish W&B).

The model side: `state.engine` (DeepSpeed engine around the `TidarObjective`), `state.objective`
(`engine.module`), `state.model` (the `TidarLM` adapter), `state.lm` (the transformers model). The run side:
`state.cfg`, `state.run_dir`, `state.data`, `state.tokenizer`, `state.logger`, `state.budget`, ranks.
A router-bias update, for instance, is an `on_micro_step_end` (or `on_step_end`) that reads `state.lm`.

Order: every hook runs the callbacks by their `order` (stable, lower first). A callback's default order is 0; the
built-ins (trainer/standard_callbacks.py) sit around it: metrics (-20) and held-out eval (-10) first, then yours,
then checkpoint (10), export (20), releasing the engine (30), the decoder check (40), the summary (50) and the
progress bar (60). So a callback that sets `should_save`/`should_stop` in `on_step_end` is seen by the checkpoint
callback in the same step, and one that needs the engine in `on_phase_end` runs before it is released.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainState:
    """Everything a callback may read; the counters (`step`, `tokens_seen`) and flags are the loop's state."""

    cfg: Any
    run_dir: Path
    rank: int
    world_size: int
    dp_rank: int
    budget: Any
    tokenizer: Any
    logger: Any
    data: Any = None
    engine: Any = None
    step: int = 0
    tokens_seen: int = 0
    step_terms: list = field(default_factory=list)
    should_save: bool = False
    should_stop: bool = False
    stopped_early: bool = False
    export_dir: Path | None = None
    # objects whose state_dict() goes into every checkpoint's client state under their key (e.g. a controller)
    checkpointed: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # what one callback leaves for another (e.g. the eval result)

    @property
    def objective(self):
        return self.engine.module

    @property
    def model(self):
        return self.engine.module.model

    @property
    def lm(self):
        return self.engine.module.lm

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def device(self):
        return self.engine.device


class Callback:
    """No-op hooks; override the ones a feature needs (see the module docstring)."""

    order: int = 0

    def on_phase_start(self, state: TrainState) -> None:
        pass

    def on_batch(self, state: TrainState, batch: dict) -> dict:
        return batch

    def on_micro_step_end(self, state: TrainState, out) -> None:
        pass

    def on_step_end(self, state: TrainState) -> None:
        pass

    def on_save(self, state: TrainState, step: int) -> None:
        pass

    def on_phase_end(self, state: TrainState) -> None:
        pass

    def on_close(self, state: TrainState) -> None:
        pass


class Callbacks(Callback):
    """A list of callbacks called in order; `on_batch` threads the batch through each."""

    def __init__(self, callbacks):
        self.callbacks = sorted(callbacks, key=lambda c: c.order)

    def on_phase_start(self, state):
        for c in self.callbacks:
            c.on_phase_start(state)

    def on_batch(self, state, batch):
        for c in self.callbacks:
            batch = c.on_batch(state, batch)
        return batch

    def on_micro_step_end(self, state, out):
        for c in self.callbacks:
            c.on_micro_step_end(state, out)

    def on_step_end(self, state):
        for c in self.callbacks:
            c.on_step_end(state)

    def on_save(self, state, step):
        for c in self.callbacks:
            c.on_save(state, step)

    def on_phase_end(self, state):
        for c in self.callbacks:
            c.on_phase_end(state)

    def on_close(self, state):
        for c in self.callbacks:
            c.on_close(state)
