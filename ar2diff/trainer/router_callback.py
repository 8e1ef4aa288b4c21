"""Router load balancing as a `PhaseTrainer` callback: ZAYA's bias controller (ar2diff/model/router_balance.py) runs
after every optimizer step, and the router load metrics of every MoE architecture are logged. Its controller state
travels with the checkpoint (`state.checkpointed`, restored by `TrainState.load_state_dict`), so a resumed run
updates the biases exactly as before."""

from __future__ import annotations

from ar2diff.model.router_balance import RouterBalancer
from ar2diff.trainer.callbacks import Callback, TrainState
from ar2diff.trainer.schedule import lr_at, warmup_steps


class RouterBalancing(Callback):
    order = -5  # after the step's metrics, before its checkpoint

    def __init__(self, balancer: RouterBalancer):
        self.balancer = balancer  # in `state.checkpointed`: saved and restored with the rest of the phase's state

    def on_step_end(self, state: TrainState) -> None:
        self.balancer.after_step(state.step, state.logger, state.cfg.trainer.log_every, state.device,
                                 rate_scale(state))


def rate_scale(state: TrainState) -> float:
    """The bias update rate's multiplier after optimizer step `state.step`: 1, or with `router_balance.follow_lr` the
    schedule's decay (lr / peak lr once warmup is over; 1 during warmup, when the load moves most)."""
    cfg = state.cfg
    if not cfg.router_balance.follow_lr:
        return 1.0
    step = state.step - 1  # the 0-based optimizer step just taken
    if step < warmup_steps(cfg.schedule, state.budget.steps):
        return 1.0
    return max(cfg.router_balance.follow_lr_floor, lr_at(step, cfg.schedule, state.budget.steps) / cfg.schedule.lr)
