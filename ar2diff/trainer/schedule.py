"""Learning-rate schedules as pure functions of the step, plus the torch LambdaLR built from them.

Three schedules, each with a linear warmup from ``lr / warmup`` up to ``lr``:

- ``cosine``: cosine from ``lr`` down to ``min_lr`` over the steps after warmup (TiDAR: 1e-5 -> 3e-6 with 1%
  warmup, arXiv 2511.08923 section 4).
- ``wsd`` (warmup-stable-decay): ``lr`` held constant, then a decay to ``min_lr`` over the last
  ``decay_fraction`` of the steps, with a ``linear``, ``cosine`` or ``1-sqrt`` shape.
- ``constant``: ``lr`` after warmup.

Conventions (0-based ``step`` = the optimizer step about to be taken, as torch's LambdaLR counts):
warmup step ``s < W`` uses ``lr * (s + 1) / W`` so no step is wasted at lr 0 and step ``W - 1`` is at ``lr``;
the cosine decay starts at ``lr`` on step ``W`` and reaches ``min_lr`` exactly on the last step
``total_steps - 1``; the WSD decay takes its first step below ``lr`` on step ``total_steps - D`` and reaches
``min_lr`` exactly on the last step. Steps past the end stay at ``min_lr`` (``lr`` for ``constant``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ar2diff.config.schedule import DECAY_SHAPES, SCHEDULES, ScheduleConfig, decay_steps, warmup_steps  # noqa: F401


def decay_factor(progress: float, shape: str) -> float:
    """Fraction of the ``lr - min_lr`` gap left at ``progress`` in [0, 1] through a decay (1 at 0, 0 at 1)."""
    progress = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    raise ValueError(f"schedule.decay_shape={shape!r} is not one of {DECAY_SHAPES}")


def lr_at(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    """The learning rate for 0-based optimizer step ``step`` of a run of ``total_steps`` steps."""
    warmup = warmup_steps(cfg, total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.name == "constant":
        return cfg.lr
    if cfg.name == "cosine":
        progress = (step - warmup) / max(1, total_steps - 1 - warmup)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * decay_factor(progress, "cosine")
    if cfg.name == "wsd":
        decay = decay_steps(cfg, total_steps)
        decay_start = total_steps - decay
        if step < decay_start:
            return cfg.lr
        progress = (step - decay_start + 1) / decay
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * decay_factor(progress, cfg.decay_shape)
    raise ValueError(f"schedule.name={cfg.name!r} is not one of {SCHEDULES}")


def lr_multiplier(cfg: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    """``step -> lr_at(step) / cfg.lr``: the function torch's LambdaLR multiplies the optimizer's lr by.

    A plain closure on purpose: LambdaLR's state_dict skips plain functions, so a resumed run takes its
    schedule from the config it was started with and only its step from the checkpoint.
    """
    cfg.validate(total_steps)

    def multiplier(step: int) -> float:
        return lr_at(step, cfg, total_steps) / cfg.lr

    return multiplier


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig,
                       total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``optimizer`` (whose param groups must have ``lr == cfg.lr``) following ``cfg``."""
    for index, group in enumerate(optimizer.param_groups):
        if not math.isclose(group["lr"], cfg.lr, rel_tol=1e-12):
            raise ValueError(f"optimizer param group {index} has lr={group['lr']} but schedule.lr={cfg.lr}; "
                             "build the optimizer with lr=schedule.lr (the scheduler only multiplies it)")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, total_steps))
