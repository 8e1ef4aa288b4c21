"""Config checks for sequence parallelism (deepspeed.sequence_parallel_size > 1), run by PhaseConfig.validate before
any work starts. They read values only (and model.path's config.json)."""

from __future__ import annotations

import json
from pathlib import Path

SP_ATTENTION = ("sdpa", "flex_attention")


def check_sequence_parallel(size: int, seq_len: int, objective_kind: str, attn_implementation: str,
                            model_config: dict | None, expert_parallel_size: int = 1) -> None:
    """Raise ValueError naming the key when a sequence-parallel setting cannot work. The combinations DeepSpeed
    itself cannot run (ZeRO-3 + AutoEP + SP) are refused in EngineConfig.validate."""
    if size == 1:
        return
    if objective_kind != "tidar":
        raise ValueError(f"deepspeed.sequence_parallel_size={size} needs objective.kind=tidar: AR pretraining rows "
                         "are not sharded; set deepspeed.sequence_parallel_size=1")
    if expert_parallel_size > 1:
        raise ValueError(f"deepspeed.sequence_parallel_size={size} with deepspeed.expert_parallel_size="
                         f"{expert_parallel_size} is not supported: AutoEP replaces the router whose logits the "
                         "sequence-parallel balancing loss reduces over the group; use one of the two")
    if seq_len % size:
        raise ValueError(f"data.seq_len={seq_len} is not divisible by deepspeed.sequence_parallel_size={size}: each "
                         "rank holds seq_len / size positions of both streams")
    if attn_implementation not in SP_ATTENTION:
        raise ValueError(f"model.attn_implementation={attn_implementation!r} cannot run under sequence parallelism "
                         f"(the gathered attention takes the TiDAR mask); use one of {SP_ATTENTION}")
    lookback = stream_lookback(model_config or {})
    if lookback > seq_len // size:
        raise ValueError(f"each sequence-parallel shard holds data.seq_len / deepspeed.sequence_parallel_size = "
                         f"{seq_len // size} positions per stream, fewer than the {lookback} positions ZAYA's CCA reads "
                         "before a token (cca_time0 - 1 + cca_time1 - 1): lower deepspeed.sequence_parallel_size or "
                         "raise data.seq_len")
    heads = (model_config or {}).get("num_attention_heads")
    if heads is not None and heads % size:
        raise ValueError(f"deepspeed.sequence_parallel_size={size} must divide the model's {heads} query heads "
                         "(model.config.num_attention_heads): Ulysses scatters heads over the ranks")


def stream_lookback(model_config: dict) -> int:
    """Positions of each stream a ZAYA shard reads from the previous rank (the sequence-parallel halo): the CCA
    convolution window (cca_time0 - 1) + (cca_time1 - 1), and at least 1, since the delayed value always reads the
    previous token; 0 for other models. `ar2diff.model.zaya_halo.halo_length` is the same number read off a model."""
    if model_config.get("model_type") != "zaya":
        return 0
    from transformers import ZayaConfig

    defaults = ZayaConfig()
    window = sum(int(model_config.get(key, getattr(defaults, key))) - 1 for key in ("cca_time0", "cca_time1"))
    return max(1, window)


def saved_model_config(path: str | None) -> dict | None:
    """`path`/config.json as a dict (None when there is none: the model load names that problem later)."""
    try:
        return json.loads((Path(path) / "config.json").read_text()) if path else None
    except (OSError, ValueError):
        return None
