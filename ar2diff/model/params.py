"""Parameter counts of a transformers model: total, routed-expert, active per token, matmul-active (for MFU and
the decoding projection). One place, so the trainer's log line, MFU and eval.json's projection count alike."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

# Config attributes HF MoE configs use for the number of routed experts and the experts each token uses.
NUM_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k")


def total_and_expert_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, those of routed experts: under an ``.experts.`` module); ZeRO-3 shards count in full."""
    total = expert = 0
    for name, param in model.named_parameters():
        numel = getattr(param, "ds_numel", param.numel())
        total += numel
        if ".experts." in f".{name}":
            expert += numel
    return total, expert


class ParamCount(NamedTuple):
    """Parameter counts: ``active`` is what one token's forward uses (None for an MoE whose config lacks the
    expert counts); ``matmul_active`` drops the input-embedding lookup (kept when tied to the output head)."""

    total: int
    active: int | None
    matmul_active: int | None


def _first_attr(config: Any, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def count_params(model: torch.nn.Module) -> ParamCount:
    """Count parameters of an unwrapped model (call before ``build_engine``: AutoEP shards experts).

    Expert weights are the parameters under an ``.experts.`` module; an MoE token uses ``top_k / num_experts``
    of them, read from the HF config (``num_experts``/``num_local_experts``/``n_routed_experts`` and
    ``num_experts_per_tok``). Shared experts and routers count as always active.
    """
    total, expert = total_and_expert_params(model)
    config = getattr(model, "config", None)
    num_experts, top_k = _first_attr(config, NUM_EXPERTS_KEYS), _first_attr(config, TOP_K_KEYS)
    if expert == 0:
        active = total
    elif num_experts and top_k:
        active = total - expert + expert * top_k // num_experts
    else:
        return ParamCount(total, None, None)
    embedding = _embedding_lookup_numel(model)
    return ParamCount(total, active, active - embedding)


def _embedding_lookup_numel(model: torch.nn.Module) -> int:
    """Input-embedding parameters that are only looked up (0 when tied: the tied matrix is the LM head)."""
    get_in = getattr(model, "get_input_embeddings", None)
    embeddings = get_in() if get_in else None
    if embeddings is None:
        return 0
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if get_out else None
    if head is not None and head.weight is embeddings.weight:
        return 0
    return getattr(embeddings.weight, "ds_numel", embeddings.weight.numel())
