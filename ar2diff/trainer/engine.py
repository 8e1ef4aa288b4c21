"""The one place that builds the DeepSpeed engine: ZeRO stage, precision, AutoEP expert parallelism, optimizer.

``build_ds_config`` turns a typed ``EngineConfig`` into DeepSpeed's JSON dict (pure, so it is tested without a
process group); ``build_engine`` initialises distributed, makes the torch AdamW (never DeepSpeed's compiled Adam:
it takes ~45 s to build on CPU and is not needed for correctness) and the LambdaLR from ``schedule.py``, and
hands both to ``deepspeed.initialize``. The training loop then calls ``engine(...)``, ``engine.backward(loss)``
and ``engine.step()``.

The FLOPs-per-token estimate for MFU lives here too; parameter counts (total, active, matmul-active) are
ar2diff/model/params.py's.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.module_inject.auto_ep_presets.registry import get_preset, preset_name_for_hf_model_type
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from ar2diff.config.engine import PRECISIONS, EngineConfig  # noqa: F401 (re-exported)
from ar2diff.config.schedule import ScheduleConfig  # noqa: F401 (re-exported)
from ar2diff.dtypes import cpu_bf16
from ar2diff.model.params import NUM_EXPERTS_KEYS, TOP_K_KEYS, ParamCount, count_params  # noqa: F401 (re-exported)
from ar2diff.trainer.distributed import init_distributed
from ar2diff.trainer.schedule import build_lr_scheduler
from ar2diff.trainer.sequence_parallel import sequence_parallel_setup


def build_ds_config(cfg: EngineConfig, world_size: int, *, on_cpu: bool = False,
                    autoep_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """DeepSpeed's config dict for ``cfg`` on ``world_size`` ranks (pure; validates ``cfg`` first).

    Optimizer and LR scheduler are not in it: ``build_engine`` passes a torch AdamW and a LambdaLR as client
    objects. ``on_cpu`` only selects AutoEP's expert loop when ``cfg.expert_grouped_mm`` is None;
    ``autoep_overrides`` (see ``autoep_layer_overrides``) go into the ``expert_parallel`` section.
    """
    cfg.validate(world_size)
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if not cfg.reduce_scatter:
        zero["reduce_scatter"] = False
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    config: dict[str, Any] = {
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum_steps * cfg.dp_world_size(world_size),
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        # ZeRO-Offload insists on DeepSpeedCPUAdam unless told otherwise; we keep the torch AdamW.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.sequence_parallel_size > 1:
        config["sequence_parallel_size"] = cfg.sequence_parallel_size
    if cfg.expert_parallel_size > 1:
        grouped_mm = (not on_cpu) if cfg.expert_grouped_mm is None else cfg.expert_grouped_mm
        config["expert_parallel"] = {
            "enabled": True,
            "autoep_size": cfg.expert_parallel_size,
            "use_grouped_mm": grouped_mm,
            **(autoep_overrides or {}),
        }
    return config


def find_hf_model(model: torch.nn.Module) -> tuple[str, torch.nn.Module | None]:
    """The outermost transformers PreTrainedModel in ``model`` (``model`` itself, or e.g. a wrapper's ``lm``)
    and its module name ("" for the root); ``("", None)`` when there is none."""
    from transformers import PreTrainedModel

    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            return name, module
    return "", None


def autoep_layer_overrides(model: torch.nn.Module) -> dict[str, str]:
    """AutoEP settings that let it find the MoE layers of an HF model wrapped in another module.

    AutoEP matches MoE blocks by their full name from the module handed to DeepSpeed (Qwen3-MoE:
    ``model.layers.N.mlp``), so for a wrapper holding the HF model at ``lm`` the pattern needs the ``lm.``
    prefix. Returns {} when ``model`` is itself the HF model or holds no model type AutoEP has a preset for.
    """
    name, hf_model = find_hf_model(model)
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    preset_name = preset_name_for_hf_model_type(model_type) if model_type else None
    if preset_name is None or name == "":
        return {}
    return {"preset_model": preset_name,
            "moe_layer_pattern": re.escape(name + ".") + get_preset(preset_name).moe_layer_pattern}


def _shape(param: torch.nn.Parameter) -> torch.Size:
    """The full shape of a parameter, also when ZeRO-3 has partitioned it to an empty tensor."""
    return getattr(param, "ds_shape", param.shape)


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two named groups: matrices decay, vectors (norms, biases) do not."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if len(_shape(param)) >= 2 else no_decay).append(param)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer_factory(model: torch.nn.Module, cfg: EngineConfig,
                           lr: float) -> Callable[[Any], torch.optim.Optimizer]:
    """A callable DeepSpeed calls to build the torch AdamW, after AutoEP has replaced the MoE blocks.

    It reads the live parameters of ``model`` at call time (DeepSpeed's argument is ignored), so replaced
    expert weights are the ones optimised; with experts sharded, their parameters go in their own
    expert-data-parallel groups (what DeepSpeed's MoE gradient reduction requires).
    """

    def factory(_model_parameters: Any) -> torch.optim.Optimizer:
        groups = [group for group in optimizer_param_groups(model, cfg.weight_decay) if group["params"]]
        if cfg.expert_parallel_size > 1:
            groups = split_params_into_different_moe_groups_for_optimizer(groups)
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay)

    return factory


def build_engine(model: torch.nn.Module, cfg: EngineConfig, schedule_cfg: ScheduleConfig,
                 total_steps: int) -> deepspeed.DeepSpeedEngine:
    """Wrap ``model`` (an HF causal LM or any nn.Module) in a DeepSpeed engine with AdamW and the LR schedule.

    Initialises distributed first (single process works too). With ``cfg.expert_parallel_size > 1`` DeepSpeed
    AutoEP replaces the model's MoE blocks in place, so ``model`` must be, or hold, an AutoEP-supported HF MoE.
    """
    ctx = init_distributed()
    cfg.validate(ctx.world_size)
    schedule_cfg.validate(total_steps)
    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu and cfg.precision == "bf16":
        fast, why = cpu_bf16()
        if not fast:
            warnings.warn(f"deepspeed.precision='bf16' on this CPU runs slowly ({why}); use 'fp32'", stacklevel=2)
    if cfg.activation_checkpointing:
        _, hf_model = find_hf_model(model)
        if hf_model is None:
            raise ValueError("deepspeed.activation_checkpointing=true needs a transformers PreTrainedModel in the "
                             f"model (its gradient_checkpointing_enable); {type(model).__name__} holds none")
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    autoep_overrides = autoep_layer_overrides(model) if cfg.expert_parallel_size > 1 else None
    mpu = sequence_parallel_setup(model, cfg.sequence_parallel_size, cfg.micro_batch_size)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        mpu=mpu,
        optimizer=make_optimizer_factory(model, cfg, schedule_cfg.lr),
        lr_scheduler=lambda optimizer: build_lr_scheduler(optimizer, schedule_cfg, total_steps),
        config=build_ds_config(cfg, ctx.world_size, on_cpu=on_cpu, autoep_overrides=autoep_overrides),
        dist_init_required=False,
    )
    return engine


def flops_per_token(model_config: Any, seq_len: int, matmul_active_params: int | None = None) -> float:
    """Training FLOPs per token, ``6 * N + 12 * L * H * d * T`` (PaLM appendix B), for MFU.

    ``N`` = active matmul parameters (built on the meta device from ``model_config`` when not given),
    ``L`` layers, ``H * d`` = heads times head dim, ``T = seq_len`` the length the model sees (2S for a TiDAR
    layout of S tokens). The attention term counts the full ``T x T`` score matrix, with no causal halving.
    """
    if matmul_active_params is None:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            meta_model = AutoModelForCausalLM.from_config(model_config)
        matmul_active_params = count_params(meta_model).matmul_active
        if matmul_active_params is None:
            raise ValueError(f"{type(model_config).__name__} has expert weights but no "
                             f"{NUM_EXPERTS_KEYS}/{TOP_K_KEYS}; pass matmul_active_params")
    layers = model_config.num_hidden_layers
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return 6.0 * matmul_active_params + 12.0 * layers * heads * head_dim * seq_len
