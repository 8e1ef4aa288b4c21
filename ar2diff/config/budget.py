"""Token budgets -> optimizer steps (pure arithmetic; printed at start-up so a recipe's scale is visible).

A recipe states its budget in tokens (docs/design.md: 600B at 32k, 500B at 128k). One optimizer step consumes
`global_batch_size` rows of `seq_len` tokens, so steps = ceil(tokens / (global_batch_size * seq_len)). The tokens
counted are the training sequence's own tokens (S per row), not the 2S positions of the TiDAR layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    tokens: int
    seq_len: int
    global_batch_size: int  # rows per optimizer step, all ranks and accumulation steps together
    micro_batch_size: int
    grad_accum_steps: int
    data_parallel_size: int
    steps: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    @property
    def tokens_trained(self) -> int:
        return self.steps * self.tokens_per_step

    def describe(self) -> str:
        return (f"budget {self.tokens:,} tokens at seq_len {self.seq_len:,}: {self.steps:,} steps x "
                f"{self.global_batch_size:,} rows ({self.micro_batch_size} micro x {self.grad_accum_steps} accum x "
                f"{self.data_parallel_size} data-parallel ranks) = {self.tokens_per_step:,} tokens/step, "
                f"{self.tokens_trained:,} tokens in all")


def plan_budget(tokens: int, seq_len: int, global_batch_size: int, micro_batch_size: int,
                data_parallel_size: int) -> Budget:
    """Steps and gradient accumulation for a token budget; errors name the key to change."""
    if seq_len < 1:
        raise ValueError(f"data.seq_len={seq_len} must be >= 1")
    if tokens < 1:
        raise ValueError(f"budget.tokens={tokens} must be >= 1")
    if micro_batch_size < 1:
        raise ValueError(f"deepspeed.micro_batch_size={micro_batch_size} must be >= 1")
    per_micro_round = micro_batch_size * data_parallel_size
    if global_batch_size < 1 or global_batch_size % per_micro_round:
        raise ValueError(
            f"budget.global_batch_size={global_batch_size} is not a multiple of deepspeed.micro_batch_size "
            f"({micro_batch_size}) x data-parallel ranks ({data_parallel_size}) = {per_micro_round}; "
            f"use e.g. budget.global_batch_size={max(1, global_batch_size // per_micro_round) * per_micro_round}")
    tokens_per_step = global_batch_size * seq_len
    if tokens < tokens_per_step:
        raise ValueError(
            f"budget.tokens={tokens:,} is below one optimizer step ({global_batch_size} rows x {seq_len} tokens = "
            f"{tokens_per_step:,}); raise budget.tokens or lower budget.global_batch_size / data.seq_len")
    return Budget(tokens=tokens, seq_len=seq_len, global_batch_size=global_batch_size,
                  micro_batch_size=micro_batch_size, grad_accum_steps=global_batch_size // per_micro_round,
                  data_parallel_size=data_parallel_size, steps=math.ceil(tokens / tokens_per_step))
