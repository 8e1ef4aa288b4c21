"""Typed settings of the learning-rate schedule, the `schedule` config group (plain data: validated here; the
LambdaLR is built in trainer/schedule.py)."""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("cosine", "wsd", "constant")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


@dataclass
class ScheduleConfig:
    """LR schedule settings; ``warmup_steps`` (when set) overrides ``warmup_fraction``."""

    name: str = "cosine"
    lr: float = 1e-5
    min_lr: float = 3e-6
    warmup_fraction: float = 0.01
    warmup_steps: int | None = None
    decay_fraction: float = 0.1
    decay_shape: str = "linear"

    def validate(self, total_steps: int | None = None) -> "ScheduleConfig":
        """Raise ValueError naming the bad key; with ``total_steps``, also check the phases fit in it."""
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule.name={self.name!r} is not one of {SCHEDULES}")
        if not self.lr > 0:
            raise ValueError(f"schedule.lr={self.lr} must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"schedule.min_lr={self.min_lr} must be in [0, schedule.lr={self.lr}]")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"schedule.warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps={self.warmup_steps} must be >= 0 (or null to use "
                             "schedule.warmup_fraction)")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"schedule.decay_shape={self.decay_shape!r} is not one of {DECAY_SHAPES}")
        if self.name == "wsd" and not 0 < self.decay_fraction <= 1:
            raise ValueError(f"schedule.decay_fraction={self.decay_fraction} must be in (0, 1] for the wsd schedule")
        if total_steps is not None:
            if total_steps < 1:
                raise ValueError(f"total_steps={total_steps} must be >= 1 (check the token budget and batch size)")
            used = warmup_steps(self, total_steps) + (decay_steps(self, total_steps) if self.name == "wsd" else 0)
            if used > total_steps:
                raise ValueError(f"schedule warmup ({warmup_steps(self, total_steps)} steps) plus decay "
                                 f"({decay_steps(self, total_steps)} steps) exceed total_steps={total_steps}; "
                                 "lower schedule.warmup_steps/warmup_fraction or schedule.decay_fraction")
        return self


def warmup_steps(cfg: ScheduleConfig, total_steps: int) -> int:
    """Number of warmup steps: ``cfg.warmup_steps`` if set, else ``round(warmup_fraction * total_steps)``."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return round(cfg.warmup_fraction * total_steps)


def decay_steps(cfg: ScheduleConfig, total_steps: int) -> int:
    """Number of WSD decay steps at the end of training: ``round(decay_fraction * total_steps)``, at least 1."""
    return max(1, round(cfg.decay_fraction * total_steps))
