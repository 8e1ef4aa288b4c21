"""Parameter counts and the shape of a transformers model: total, routed-expert, active per token, matmul-active,
widths (for MFU, the decoding projection and the memory plan). One place, so the trainer's log line, MFU, eval.json's
projection and the plan count alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

# Config attributes HF MoE configs use for the number of routed experts and the experts each token uses.
NUM_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "moe_top_k", "top_k")


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


@dataclass(frozen=True)
class ModelShape:
    """A model's size and widths: what the decoding projection's cost model and the memory plan need of it (one
    shape for both, built by `model_shape`). Dense models: total == active, num_experts == 1.

    active_params: parameters one token multiplies through (incl. its k experts and the LM head).
    num_experts / experts_per_token: routed experts per MoE layer and top-k; shared experts are not routed
    and belong in the always-touched part (they are in both totals).
    """

    total_params: float
    active_params: float
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    num_query_heads: int | None = None
    num_experts: int = 1
    experts_per_token: int = 1
    bytes_per_param: float = 2.0
    kv_bytes_per_elem: float = 2.0
    expert_params: float = 0.0  # parameters under an ``.experts.`` module (all layers)
    largest_layer_params: float = 0.0  # the largest decoder layer (ZeRO-3's live gathered parameters)
    mlp_width: int = 0  # active MLP intermediate width per token (top-k experts' + shared)
    vocab_size: int = 0
    # what the memory plan's activation terms read (`ar2diff.plan.memory`)
    model_type: str = ""
    qk_norm: bool = False  # per-head RMSNorm of q and k (Qwen3, Qwen3-MoE)
    router_hidden: int = 0  # ZAYA's router MLP width
    cca_window: int = 0  # ZAYA's CCA convolution look-back, (cca_time0 - 1) + (cca_time1 - 1)
    largest_tensor_params: float = 0.0  # the largest single parameter tensor (a non-flattened optimizer's step)

    def __post_init__(self) -> None:
        if not 0 < self.active_params <= self.total_params:
            raise ValueError(
                f"ModelShape needs 0 < active_params <= total_params, got active={self.active_params}, "
                f"total={self.total_params}"
            )
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(
                f"ModelShape needs 1 <= experts_per_token <= num_experts, got {self.experts_per_token} and "
                f"{self.num_experts} (dense: num_experts=1, experts_per_token=1)"
            )
        routed = self.num_experts > self.experts_per_token
        if routed == (self.total_params == self.active_params):
            raise ValueError(
                "ModelShape: total_params == active_params means a dense model (num_experts == experts_per_token) "
                f"and vice versa; got total={self.total_params}, active={self.active_params}, "
                f"num_experts={self.num_experts}, experts_per_token={self.experts_per_token}"
            )

    @property
    def routed_params(self) -> float:
        """Parameters of all routed experts, all layers: E * (total - active) / (E - k); 0 for dense."""
        E, k = self.num_experts, self.experts_per_token
        return 0.0 if E == k else E * (self.total_params - self.active_params) / (E - k)

    @property
    def attn_width(self) -> int:
        """The query width QK^T and PV run over (the projection's attention FLOPs)."""
        return self.num_query_heads * self.head_dim if self.num_query_heads else self.hidden_size

    @property
    def qkv_width(self) -> int:
        """Query + key + value projection widths (the memory plan's activations)."""
        return ((self.num_query_heads or 0) + 2 * self.num_kv_heads) * self.head_dim


def model_shape(model: torch.nn.Module) -> ModelShape:
    """The shape of a transformers model (real or on the meta device): parameter counts from its parameters (ZeRO-3
    shards count in full), widths from its config; bf16 weights and KV for the projection.

    Routed expert weights are the parameters under an `.experts.` module; a token uses top_k / num_experts of them.
    """
    config = model.config
    total, expert = total_and_expert_params(model)
    num_experts, top_k = _first_attr(config, NUM_EXPERTS_KEYS) or 1, _first_attr(config, TOP_K_KEYS) or 1
    routed = expert > 0 and num_experts > top_k
    active = total - expert + expert * top_k / num_experts if routed else total
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = model.get_decoder().layers
    largest = max(sum(getattr(p, "ds_numel", p.numel()) for p in layer.parameters()) for layer in layers)
    largest_tensor = max(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    if expert:
        width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        mlp = top_k * width + (getattr(config, "shared_expert_intermediate_size", 0) or 0)
    else:
        mlp = getattr(config, "intermediate_size", 0) or 0
    return ModelShape(total_params=float(total), active_params=float(active), num_layers=config.num_hidden_layers,
                      hidden_size=config.hidden_size, num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                      head_dim=head_dim, num_query_heads=heads, num_experts=num_experts if routed else 1,
                      experts_per_token=top_k if routed else 1, expert_params=float(expert),
                      largest_layer_params=float(largest), mlp_width=mlp, vocab_size=config.vocab_size,
                      model_type=config.model_type, qk_norm=config.model_type in ("qwen3", "qwen3_moe"),
                      router_hidden=getattr(config, "router_hidden_size", 0) or 0,
                      cca_window=(config.cca_time0 - 1) + (config.cca_time1 - 1) if config.model_type == "zaya" else 0,
                      largest_tensor_params=float(largest_tensor))
