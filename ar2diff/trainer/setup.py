"""Assemble the parts of one phase: tokenizer and model (loaded or built, RoPE/context overrides, [MASK])."""

from __future__ import annotations

from ar2diff.config.schema import PhaseConfig
from ar2diff.dtypes import torch_dtype
from ar2diff.model import TidarLM, add_mask_token, build_model, load_model
from ar2diff.model.loading import make_config
from ar2diff.model.rope import check_theta_raised, rope_thetas
from ar2diff.objective import DiffTarget, TidarObjective


def apply_rope_overrides(config, rope: dict, max_positions: int | None) -> None:
    """Context extension: update RoPE parameters (every per-layer-type entry for nested layouts) and the limit."""
    if rope:
        params = getattr(config, "rope_parameters", None)
        if params is None:
            raise ValueError(f"model.rope={rope} given but the {config.model_type} config has no rope_parameters")
        nested = all(isinstance(v, dict) for v in params.values())
        for entry in (params.values() if nested else [params]):
            entry.update(rope)
    if max_positions is not None:
        config.max_position_embeddings = max_positions


def build_phase_model(cfg: PhaseConfig, tokenizer) -> TidarObjective:
    """The HF model of this phase as a TidarLM inside its TidarObjective (objective.kind: TiDAR or plain AR)."""
    m, o = cfg.model, cfg.objective
    dtype = torch_dtype(m.dtype, "model.dtype")
    if m.path is not None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(m.path)
        thetas_before = rope_thetas(config)
        apply_rope_overrides(config, dict(m.rope), m.max_position_embeddings)
        if cfg.phase == "context_extension" and "rope_theta" in m.rope:
            check_theta_raised(thetas_before, rope_thetas(config), source=m.path)
        # every rank loads model.path: each verifies its share of the export's files (load_model(collective=True))
        lm = load_model(m.path, attn_implementation=m.attn_implementation, dtype=dtype, config=config,
                        collective=True)
    else:
        arch = dict(m.config)
        arch.setdefault("vocab_size", len(tokenizer))
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            arch.setdefault(key, getattr(tokenizer, key))
        config = make_config(arch)
        apply_rope_overrides(config, dict(m.rope), m.max_position_embeddings)
        lm = build_model(config, attn_implementation=m.attn_implementation, dtype=dtype, seed=m.init_seed)
    if max(cfg.data.seq_len, 1) > lm.config.max_position_embeddings:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_position_embeddings="
                         f"{lm.config.max_position_embeddings}; set model.max_position_embeddings (and model.rope)")
    if o.kind == "ar":
        return TidarObjective(TidarLM(lm, mask_token_id=None, block_size=o.block_size), kind="ar",
                              aux_coef=o.aux_coef)
    mask_id = add_mask_token(lm, tokenizer, o.block_size)
    return TidarObjective(TidarLM(lm, mask_id, o.block_size), alpha=o.alpha, mask_ratio=o.mask_ratio,
                          aux_coef=o.aux_coef, loss_chunk_size=o.loss_chunk_tokens,
                          diff_target=DiffTarget(o.diff_target, o.diff_target_weight, o.diff_target_temperature))
