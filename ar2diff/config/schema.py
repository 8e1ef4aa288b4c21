"""Typed configuration of one training phase (and of a pipeline of phases).

Plain dataclasses: Hydra composes YAML onto them (a typo'd key fails at composition, naming the key), then
`PhaseConfig.validate(world_size)` checks values once, before any work starts. No module reads a global config:
the trainer passes these values down.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ar2diff.config.data import DataConfig
from ar2diff.config.engine import EngineConfig
from ar2diff.config.quality import QualityEvalConfig
from ar2diff.config.router import RouterBalanceConfig
from ar2diff.config.schedule import ScheduleConfig
from ar2diff.config.sequence_parallel import check_sequence_parallel, saved_model_config

PHASES = ("ar_pretrain", "tidar_midtrain", "context_extension", "diffusion_sft")
OBJECTIVES = ("tidar", "ar")
DIFF_TARGETS = ("data", "ar", "mix")  # objective.diff_target (ar2diff.objective.DiffTarget)


@dataclass
class ModelConfig:
    """Where the model comes from: a local HF folder (`path`) or a config to build from scratch (`config`).

    rope: overrides applied to the config's RoPE parameters before the weights load (context extension), e.g.
        {rope_theta: 5000000}; nested per-layer-type RoPE dicts (ZAYA) get the override in every entry.
    max_position_embeddings: raise the model's context limit (context extension).
    """

    path: str | None = None
    config: dict[str, Any] | None = None
    attn_implementation: str = "sdpa"
    dtype: str = "float32"
    rope: dict[str, Any] = field(default_factory=dict)
    max_position_embeddings: int | None = None
    init_seed: int = 0


@dataclass
class ObjectiveConfig:
    """The training objective. kind=tidar: the hybrid loss; kind=ar: plain next-token loss (AR pretraining)."""

    kind: str = "tidar"
    alpha: float = 1.0
    block_size: int = 16
    mask_ratio: float = 1.0  # 1.0 = full mask (TiDAR default); < 1 = random-mask ablation
    aux_coef: float | None = None  # router balancing loss weight; None = the model config's own
    loss_chunk_tokens: int | None = None  # head + loss per chunk of this many tokens (None: all logits at once)
    diff_target: str = "data"  # data | ar | mix: the diffusion stream's target (ar2diff.objective.DiffTarget)
    diff_target_weight: float = 0.5  # mix: weight of the detached AR distribution (data gets 1 - weight)
    diff_target_temperature: float = 1.0  # temperature of the AR soft target


@dataclass
class BudgetConfig:
    tokens: int = 1_000_000
    global_batch_size: int = 8  # rows per optimizer step (all ranks, all accumulation steps)


@dataclass
class TrainerConfig:
    log_every: int = 10
    ckpt_every: int = 500  # optimizer steps; a final checkpoint is always written
    keep_last: int = 2
    heldout_batches: int = 4  # held-out loss at phase end, in micro batches
    peak_flops: float | None = None  # per device, for MFU; None = unknown (MFU not logged)
    eval_every: int = 0  # optimizer steps between held-out AR + diffusion losses during the phase; 0 = phase end only
    # optimizer steps between intermediate exports (run_dir/exports/step_<N>, each with a light check when the
    # decoder check is on: ar2diff.evaluation.light_check); 0 = only the phase-end export
    export_every: int = 0
    progress_bar: bool = True  # rank-0 tqdm bar (step, tokens, loss, tokens/s, ETA)
    max_nonfinite_skips: int = 0  # steps with a non-finite loss/grad norm the optimizer dropped that may be skipped
    allow_config_change: bool = False  # resume even if the config changes schedule/data (differences are listed)
    # when every checkpoint of the run fails its check (corrupted), train from step 0 over them instead of refusing
    start_over: bool = False
    # how long a collective waits for a peer before the run fails with a message (a hung or dead rank); the waits
    # on rank 0 alone (export, light and decoder checks) get rank0_timeout_minutes instead
    collective_timeout_minutes: float = 10.0
    rank0_timeout_minutes: float = 240.0
    memory_plan_check: bool = True  # on an accelerator, refuse a config whose memory plan exceeds the device


@dataclass
class DecoderEvalConfig:
    """The phase-end decoder check (docs/design.md "Reference decoder")."""

    enabled: bool = True
    num_prompts: int = 32  # the TPF interval is a bootstrap over prompts (ar2diff.decode.metrics)
    prompt_len: int = 32
    max_new_tokens: int = 64
    block_size: int | None = None  # None: the objective's block size
    levels: list[int] | None = None  # None: a template for every acceptance length
    mix_weights: list[float] = field(default_factory=lambda: [0.25, 0.5])
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    light_prompts: int = 8  # greedy prompts of the light check of each intermediate export (trainer.export_every)
    quality: QualityEvalConfig = field(default_factory=QualityEvalConfig)  # base-relative losses, pass@k, positions


@dataclass
class LoggerConfig:
    wandb: bool = True
    project: str = "ar2diff"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class PipelinePhase:
    """One phase of a pipeline: a recipe name plus Hydra overrides applied on top of it."""

    recipe: str = ""
    overrides: list[str] = field(default_factory=list)
    skip_if_base: bool = False  # skipped when the user gives model.path (e.g. ar_pretrain in the quickstart)
    shared: bool = True  # the pipeline's `pipeline_overrides` apply to this phase (before its own overrides)


@dataclass
class PhaseConfig:
    name: str = "custom"  # the recipe name; outputs go under outputs/<name>/<timestamp>
    phase: str = "tidar_midtrain"
    run_dir: str | None = None
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    deepspeed: EngineConfig = field(default_factory=EngineConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    decoder: DecoderEvalConfig = field(default_factory=DecoderEvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    router_balance: RouterBalanceConfig = field(default_factory=RouterBalanceConfig)
    pipeline: list[PipelinePhase] = field(default_factory=list)
    # overrides every pipeline phase with `shared: true` gets after its recipe and before its own overrides
    pipeline_overrides: list[str] = field(default_factory=list)
    # Named inputs a pipeline recipe hands to its phases through interpolation, e.g. inputs.chat_data.
    inputs: dict[str, Any] = field(default_factory=dict)

    def validate(self, world_size: int = 1) -> PhaseConfig:
        """Check every value once; raise ValueError naming the key. Returns self."""
        if self.phase not in PHASES:
            raise ValueError(f"phase={self.phase!r} must be one of {PHASES}")
        if self.pipeline:
            for i, p in enumerate(self.pipeline):
                if not p.recipe:
                    raise ValueError(f"pipeline[{i}].recipe is empty: name the recipe of this phase")
            return self
        m, o = self.model, self.objective
        if (m.path is None) == (m.config is None):
            raise ValueError("set exactly one of model.path (a local HF checkpoint folder) and model.config "
                             "(an architecture config to build from scratch)")
        if m.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model.dtype={m.dtype!r} must be float32 or bfloat16")
        if o.kind not in OBJECTIVES:
            raise ValueError(f"objective.kind={o.kind!r} must be one of {OBJECTIVES}")
        if (o.kind == "ar") != (self.phase == "ar_pretrain"):
            raise ValueError(f"objective.kind={o.kind!r} does not fit phase={self.phase!r}: ar_pretrain trains "
                             "with kind=ar, every diffusion phase with kind=tidar")
        if o.kind == "tidar":
            if not 1 <= o.block_size <= self.data.seq_len:
                raise ValueError(f"objective.block_size={o.block_size} does not fit data.seq_len="
                                 f"{self.data.seq_len}: need 1 <= block_size <= seq_len")
            if not 0.0 < o.mask_ratio <= 1.0:
                raise ValueError(f"objective.mask_ratio={o.mask_ratio} must be in (0, 1]")
            if o.alpha < 0:
                raise ValueError(f"objective.alpha={o.alpha} must be >= 0")
            if o.loss_chunk_tokens is not None and o.loss_chunk_tokens < 1:
                raise ValueError(f"objective.loss_chunk_tokens={o.loss_chunk_tokens} must be >= 1 or null")
            if o.diff_target not in DIFF_TARGETS:
                raise ValueError(f"objective.diff_target={o.diff_target!r} must be one of {DIFF_TARGETS}")
            if not 0.0 <= o.diff_target_weight <= 1.0 or not o.diff_target_temperature > 0:
                raise ValueError(f"objective.diff_target_weight={o.diff_target_weight} must lie in [0, 1] and "
                                 f"objective.diff_target_temperature={o.diff_target_temperature} must be > 0")
        if self.phase == "diffusion_sft" and not self.data.chat:
            raise ValueError("phase=diffusion_sft needs chat data with response-only loss: set data.chat=true")
        t = self.trainer
        for key in ("log_every", "ckpt_every", "keep_last"):
            if getattr(t, key) < 1:
                raise ValueError(f"trainer.{key}={getattr(t, key)} must be >= 1")
        if not (t.collective_timeout_minutes > 0 and t.rank0_timeout_minutes > 0):
            raise ValueError(f"trainer.collective_timeout_minutes={t.collective_timeout_minutes} and "
                             f"trainer.rank0_timeout_minutes={t.rank0_timeout_minutes} must be > 0")
        if t.export_every < 0:
            raise ValueError(f"trainer.export_every={t.export_every} must be >= 0 (0: no intermediate exports)")
        if t.max_nonfinite_skips < 0:
            raise ValueError(f"trainer.max_nonfinite_skips={t.max_nonfinite_skips} must be >= 0")
        if self.logger.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode={self.logger.mode!r} must be offline, online or disabled")
        d = self.decoder
        if d.enabled and o.kind == "tidar":
            if any(not 0.0 <= w <= 1.0 for w in d.mix_weights):
                raise ValueError(f"decoder.mix_weights={d.mix_weights} must each lie in [0, 1]")
            if min(d.prompt_len, d.max_new_tokens, d.num_prompts, d.light_prompts) < 1:
                raise ValueError("decoder.prompt_len, decoder.max_new_tokens, decoder.num_prompts and "
                                 "decoder.light_prompts must be >= 1")
            if d.prompt_len >= self.data.seq_len:
                raise ValueError(f"decoder.prompt_len={d.prompt_len} must be shorter than data.seq_len="
                                 f"{self.data.seq_len} (prompts are cut from held-out rows)")
            if d.quality.enabled:
                d.quality.validate(self.data.seq_len, d.prompt_len)
        self.data.validate()
        self.router_balance.validate()
        self.deepspeed.validate(world_size)
        check_sequence_parallel(self.deepspeed.sequence_parallel_size, self.data.seq_len, o.kind,
                                m.attn_implementation, m.config if m.config is not None else saved_model_config(m.path),
                                self.deepspeed.expert_parallel_size)
        self.schedule.validate()
        return self
