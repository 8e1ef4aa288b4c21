"""Typed settings of the DeepSpeed engine, the `deepspeed` config group (plain data: validated here, used in
trainer/). The LR schedule's settings are config/schedule.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRECISIONS = ("fp32", "bf16")


@dataclass
class EngineConfig:
    """How the model is trained across ranks; every field maps to one DeepSpeed or torch setting.

    ``expert_parallel_size`` 1 is off; > 1 shards the experts of a supported HF MoE (Qwen3-MoE, Mixtral,
    DeepSeek-V2/V3, ...) with DeepSpeed AutoEP across that many ranks. ``expert_grouped_mm`` None picks
    ``torch._grouped_mm`` for the AutoEP experts except on CPU, where it falls back to a per-expert loop.
    ``sequence_parallel_size`` > 1 shards each TiDAR row over that many ranks with DeepSpeed Ulysses
    (ar2diff.trainer.sequence_parallel); the ranks of a group see the same rows.
    """

    zero_stage: int = 1
    precision: str = "bf16"
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    grad_clip: float = 1.0
    expert_parallel_size: int = 1
    expert_grouped_mm: bool | None = None
    activation_checkpointing: bool = False
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    offload_optimizer: bool = False
    offload_params: bool = False
    sequence_parallel_size: int = 1
    reduce_scatter: bool = True  # ZeRO-2/3 gradient reduce-scatter (DeepSpeed's zero_optimization.reduce_scatter)

    def validate(self, world_size: int) -> "EngineConfig":
        """Raise ValueError naming the bad key (``deepspeed.<key>``) and the fix; returns self."""
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.precision not in PRECISIONS:
            raise ValueError(f"deepspeed.precision={self.precision!r} must be one of {PRECISIONS}")
        for key in ("micro_batch_size", "grad_accum_steps", "expert_parallel_size", "sequence_parallel_size"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"deepspeed.{key}={getattr(self, key)} must be >= 1")
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be >= 1")
        if world_size % self.expert_parallel_size:
            raise ValueError(f"deepspeed.expert_parallel_size={self.expert_parallel_size} must divide the world size "
                             f"{world_size}; pick a divisor of the number of ranks")
        if world_size % self.sequence_parallel_size:
            raise ValueError(f"deepspeed.sequence_parallel_size={self.sequence_parallel_size} must divide the world "
                             f"size {world_size}; pick a divisor of the number of ranks")
        if self.expert_parallel_size > 1 and self.sequence_parallel_size > 1 and self.zero_stage == 3:
            raise ValueError("deepspeed.sequence_parallel_size > 1 with deepspeed.expert_parallel_size > 1 needs "
                             "deepspeed.zero_stage <= 2 (AutoEP on ZeRO-3 has no sequence parallelism)")
        if self.grad_clip < 0:
            raise ValueError(f"deepspeed.grad_clip={self.grad_clip} must be >= 0 (0 turns clipping off)")
        if self.weight_decay < 0:
            raise ValueError(f"deepspeed.weight_decay={self.weight_decay} must be >= 0")
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"deepspeed.betas={tuple(self.betas)} must be two numbers in [0, 1)")
        if not self.eps > 0:
            raise ValueError(f"deepspeed.eps={self.eps} must be > 0")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs deepspeed.zero_stage=3")
        return self

    def dp_world_size(self, world_size: int) -> int:
        """Ranks that see different data: sequence-parallel ranks share a sample, expert-parallel ranks do not."""
        return world_size // self.sequence_parallel_size

