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
  the trainer saves after the hook, and writes no export for a phase that stopped early.
- `on_close(state)`: always last, also after an exception (close progress bars).

The end of a phase is not a hook: `PhaseTrainer.finish` runs it as plain code (final checkpoint, export, engine
released, decoder check, summary).

The model side: `state.engine` (DeepSpeed engine around the `TidarObjective`), `state.objective`
(`engine.module`), `state.model` (the `TidarLM` adapter), `state.lm` (the transformers model). The run side:
`state.cfg`, `state.run_dir`, `state.data`, `state.tokenizer`, `state.logger`, `state.budget`, ranks.
A router-bias update, for instance, is an `on_micro_step_end` (or `on_step_end`) that reads `state.lm`.

Order: every hook runs the callbacks by their `order` (stable, lower first). A callback's default order is 0; the
built-ins sit around it: metrics (-20), the non-finite guard (-15), held-out eval (-10), router balancing (-5) first,
then yours, the preemption check (5) and the progress bar (60). A callback that sets `should_save`/`should_stop` in
`on_step_end` is seen by the trainer's checkpoint of the same step.

What a resume restores is one pair, `TrainState.state_dict()` / `load_state_dict()`: the counters, the data
position, the log history and every object in `state.checkpointed` (the router's bias controller) under its key.
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
    stopped_by: str | None = None  # the stop signal's name when a signal stopped the phase
    last_saved_step: int | None = None
    export_dir: Path | None = None
    # objects whose state_dict() goes into every checkpoint's client state under their key (e.g. a controller)
    checkpointed: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        """Everything a resume restores besides the engine (DeepSpeed's own files): the checkpoint's client state."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "data": self.data.train.state_dict(),
                "history": self.logger.history, **{key: obj.state_dict() for key, obj in self.checkpointed.items()}}

    def load_state_dict(self, client: dict) -> None:
        """Restore `state_dict()`'s content (an object missing from an older checkpoint gets None)."""
        self.step, self.tokens_seen = int(client["step"]), int(client["tokens_seen"])
        self.data.train.load_state_dict(client["data"])
        self.logger.history = list(client.get("history", []))
        for key, obj in self.checkpointed.items():
            obj.load_state_dict(client.get(key))
        self.last_saved_step = self.step

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

    def on_close(self, state):
        for c in self.callbacks:
            c.on_close(state)
