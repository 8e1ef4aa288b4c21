"""`python -m ar2diff.plan recipe=NAME world_size=N hardware=mi300x [headroom=0.1] [overrides]`.

Composes the recipe exactly as `ar2diff.train` does, reads the model's size from its config (the checkpoint's
config.json, or `model.config`) by building it on the meta device, and prints the per-rank memory of the composed
configuration (`ar2diff.plan.memory`) with the alternatives (activation checkpointing, loss chunking) beside, and
whether it fits the device with the given headroom. Exit status 1 when it does not fit.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ar2diff.config.compose import compose
from ar2diff.config.schema import PhaseConfig
from ar2diff.model.loading import make_config
from ar2diff.model.params import ModelShape
from ar2diff.model.params import model_shape as shape_of
from ar2diff.plan.memory import GiB, MemoryPlan, TrainShape, plan_memory

# Device memory in GiB as the runtime reports it (rocm-smi / nvidia-smi totals).
HARDWARE_GIB = {"mi300x": 192, "mi325x": 256, "mi355x": 288, "h100": 80, "h200": 140, "b200": 180}
PLAN_KEYS = ("world_size", "hardware", "headroom")
DATA_PLACEHOLDER = "unused-by-the-plan"


class PlanDoesNotFitError(RuntimeError):
    """The composed configuration needs more memory per rank than the device has (with headroom)."""


def hf_config_of(cfg: PhaseConfig):
    """The transformers config the phase trains: `model.path`'s config.json, or `model.config`."""
    from transformers import AutoConfig

    if cfg.model.path:
        folder = Path(cfg.model.path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"model.path={cfg.model.path!r} has no config.json to read the model size from")
        return AutoConfig.from_pretrained(folder)
    return make_config(dict(cfg.model.config, vocab_size=cfg.model.config.get("vocab_size", 32000)))


def model_shape(hf_config) -> ModelShape:
    """The shape of the model `hf_config` describes, built on the meta device (`ar2diff.model.params.model_shape`)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return shape_of(AutoModelForCausalLM.from_config(hf_config))


def train_shape(cfg: PhaseConfig, world_size: int, hardware: str) -> TrainShape:
    d = cfg.deepspeed
    impl = cfg.model.attn_implementation
    return TrainShape(
        seq_len=cfg.data.seq_len, layout_factor=2 if cfg.objective.kind == "tidar" else 1,
        micro_batch=d.micro_batch_size, world_size=world_size, zero_stage=d.zero_stage, precision=d.precision,
        expert_parallel=d.expert_parallel_size, sequence_parallel=d.sequence_parallel_size,
        activation_checkpointing=d.activation_checkpointing,
        loss_chunk_tokens=cfg.objective.loss_chunk_tokens if cfg.objective.kind == "tidar" else None,
        attn_implementation=impl,
        diff_target=cfg.objective.diff_target if cfg.objective.kind == "tidar" else "data",
        device="cpu" if hardware == "cpu" else "accelerator", mask_ratio=cfg.objective.mask_ratio,
        block_size=cfg.objective.block_size)


def device_bytes(hardware: str) -> float:
    if hardware == "cpu":
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if hardware not in HARDWARE_GIB:
        raise ValueError(f"hardware={hardware!r} is not known; use one of {sorted(HARDWARE_GIB)} or cpu")
    return HARDWARE_GIB[hardware] * GiB


def format_plan(plan: MemoryPlan, shape: ModelShape, train: TrainShape, hardware: str, capacity: float,
                headroom: float) -> str:
    lines = [f"model: {shape.total_params / 1e9:.2f}B parameters ({shape.expert_params / 1e9:.2f}B in experts), "
             f"{shape.num_layers} layers, vocab {shape.vocab_size:,}",
             f"layout: {train.micro_batch} x {train.layout_len:,} positions per micro batch; ZeRO-{train.zero_stage} "
             f"{train.precision} over {train.world_size} ranks, EP={train.expert_parallel}, "
             f"SP={train.sequence_parallel}, checkpointing={'on' if train.activation_checkpointing else 'off'}, "
             f"loss chunks={train.loss_chunk_tokens or 'off'}, attention={train.attn_implementation}",
             f"{'term':<34}{'GiB/rank':>10}"]
    lines += [f"{k:<34}{v / GiB:>10.1f}" for k, v in plan.terms.items()]
    lines.append(f"{'total':<34}{plan.total / GiB:>10.1f}")
    lines.append("alternatives:")
    lines += [f"  {k:<32}{v / GiB:>10.1f}" for k, v in plan.alternatives.items()]
    budget = capacity * (1 - headroom)
    verdict = "fits" if plan.total <= budget else "DOES NOT FIT"
    lines.append(f"{hardware}: {capacity / GiB:.0f} GiB, {budget / GiB:.0f} GiB usable with {headroom:.0%} headroom: "
                 f"{verdict} ({plan.total / capacity:.0%} of the device)")
    return "\n".join(lines)


def split_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """The plan's own key=value arguments apart from the Hydra overrides."""
    own, overrides = {}, []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in PLAN_KEYS and value:
            own[key] = value
        else:
            overrides.append(arg)
    return own, overrides


def plan_for(overrides: list[str], world_size: int, hardware: str = "mi300x"):
    """(MemoryPlan, ModelShape, TrainShape) of the composed recipe on `world_size` ranks."""
    if not any(o.startswith("data.sources") for o in overrides):
        overrides = [*overrides, f"data.sources.0.path={DATA_PLACEHOLDER}"]  # the plan reads no data
    cfg = compose(overrides)
    cfg.validate(world_size)
    shape = model_shape(hf_config_of(cfg))
    train = train_shape(cfg, world_size, hardware)
    return plan_memory(shape, train), shape, train


def main(argv: list[str] | None = None) -> int:
    own, overrides = split_args(sys.argv[1:] if argv is None else argv)
    if "world_size" not in own:
        raise SystemExit("usage: python -m ar2diff.plan recipe=NAME world_size=N hardware=mi300x [headroom=0.1] "
                         "[overrides]: world_size= is required")
    hardware, headroom = own.get("hardware", "mi300x"), float(own.get("headroom", 0.1))
    capacity = device_bytes(hardware)
    plan, shape, train = plan_for(overrides, int(own["world_size"]), hardware)
    print(format_plan(plan, shape, train, hardware, capacity, headroom))
    return 0 if plan.total <= capacity * (1 - headroom) else 1
