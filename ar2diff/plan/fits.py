"""The memory plan checked at the start of every phase on an accelerator, before any model is built.

Why: `python -m ar2diff.plan` and the launch dry run say whether a config fits, but a user who starts
`torchrun ... -m ar2diff.train` directly would otherwise learn it from an out-of-memory crash, possibly hours in
(after data preparation, model load and the first long-sequence micro batch). The same plan runs here against the
device's own memory; a config that does not fit stops with the numbers, unless `trainer.memory_plan_check=false`
(the plan is an estimate: README "Long context" says how close it is to measured peaks).
"""

from __future__ import annotations

from ar2diff.config.schema import PhaseConfig
from ar2diff.plan.cli import PlanDoesNotFitError, hf_config_of, model_shape, train_shape
from ar2diff.plan.memory import GiB, plan_memory

HEADROOM = 0.1  # the share of device memory left for the allocator, communication buffers and fragmentation


def check_plan_fits(cfg: PhaseConfig, world_size: int, capacity_bytes: float, device: str) -> float:
    """The planned bytes per rank of `cfg` on `world_size` ranks; raises PlanDoesNotFitError when they exceed
    `capacity_bytes` less HEADROOM."""
    shape = model_shape(hf_config_of(cfg))
    plan = plan_memory(shape, train_shape(cfg, world_size, device))
    usable = capacity_bytes * (1 - HEADROOM)
    if plan.total > usable:
        worst = sorted(plan.terms.items(), key=lambda kv: -kv[1])[:3]
        terms = ", ".join(f"{k} {v / GiB:.1f}" for k, v in worst)
        options = "; ".join(f"{k} {v / GiB:.1f}" for k, v in plan.alternatives.items())
        raise PlanDoesNotFitError(
            f"the memory plan needs {plan.total / GiB:.1f} GiB per rank but this {device} has {capacity_bytes / GiB:.0f} "
            f"GiB ({usable / GiB:.0f} GiB usable with {HEADROOM:.0%} headroom); largest terms (GiB): {terms}; "
            f"alternatives (GiB): {options}. Use more ranks, deepspeed.sequence_parallel_size, a higher ZeRO stage, "
            "activation checkpointing or loss chunking (see python -m ar2diff.plan), or "
            "trainer.memory_plan_check=false to start anyway")
    return plan.total


def device_capacity() -> tuple[float, str] | None:
    """(total memory in bytes, device name) of this rank's accelerator; None on CPU (no device budget to plan for)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return None
    return float(accelerator.total_memory()), accelerator.device_name()
