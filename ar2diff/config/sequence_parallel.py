"""Config checks for sequence parallelism (deepspeed.sequence_parallel_size > 1), run by PhaseConfig.validate before
any work starts. Pure: reads values only."""

from __future__ import annotations

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
    heads = (model_config or {}).get("num_attention_heads")
    if heads is not None and heads % size:
        raise ValueError(f"deepspeed.sequence_parallel_size={size} must divide the model's {heads} query heads "
                         "(model.config.num_attention_heads): Ulysses scatters heads over the ranks")
