"""Per-rank memory of a training configuration, before launch: pure arithmetic over the model's shape.

Terms (bytes per rank; Ψ = parameters, N = ranks that ZeRO partitions over, T = 2S the TiDAR layout length, P the
sequence-parallel size, b the micro batch):

- weights: Ψ_local * dtype (ZeRO-3: Ψ/N, plus the gathered live parameters of the layers being computed);
  Ψ_local = dense params + expert params / EP.
- gradients: Ψ_local * dtype (ZeRO >= 2: / N).
- optimizer: fp32 master copy, fp32 gradient partition and Adam's two moments, 16 B * Ψ / N (ZeRO >= 1; the
  expert shards are partitioned over the N/EP expert-data-parallel ranks, which gives the same total). ZeRO-0: the
  two moments in the parameter dtype.
- buffers: DeepSpeed's reduce (and, ZeRO-1/2, all-gather) buckets of 5e8 elements each.
- activations: per layer and token, the tensors saved for backward: c_h*H + c_a*(q+k+v width) + c_m*(active MLP
  width) elements (`ActivationCoefficients`). With activation checkpointing only each layer's input is kept, plus
  one layer's full set while it is recomputed. Sequence activations are divided by P (Ulysses shards the sequence;
  attention sees all positions with heads / P, the same size).
- attention scores: only where a kernel materialises them (eager, or SDPA's math path on CPU): b*heads*T^2 floats
  per layer kept (no checkpointing) or one layer's (checkpointing).
- logits: the LM head and loss over all T positions: logits in the model dtype, their fp32 upcast and gradient
  (12 B per logit in bf16); with `objective.loss_chunk_tokens` one chunk at a time.
- mask: flex BlockMask tiles (`ar2diff.model.flex_mask`: O(T + (T/128)^2)); SDPA's dense boolean b*T^2 plus its
  build peak (`DENSE_BYTES_PER_PAIR`), or for the TiDAR layout without SP the split SDPA's pieces
  (`ar2diff.model.split_attention`: at most 3/4 of that). The mask covers the full row on every rank (not divided
  by P).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ar2diff.model.attention import DENSE_BYTES_PER_PAIR
from ar2diff.model.params import ModelShape

GiB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp32": 4, "bfloat16": 2, "float32": 4}
BUCKET_ELEMENTS = 5e8  # DeepSpeed's default reduce_bucket_size and allgather_bucket_size
ZERO3_MAX_LIVE = 1e9  # DeepSpeed's default stage3_max_live_parameters
FLEX_TILE = 128


@dataclass(frozen=True)
class ActivationCoefficients:
    """Elements saved per token and layer, per unit of hidden size, attention width and MLP width.

    Hidden: residual stream, two norm inputs and outputs, attention output, o-proj input, router input (8). Attention:
    q, k, v after projection and after RoPE (2). MLP: gate, up, activation, product (4).
    """

    hidden: float = 8.0
    attn: float = 2.0
    mlp: float = 4.0


@dataclass(frozen=True)
class TrainShape:
    """The composed config's sizes that memory depends on."""

    seq_len: int  # S, data.seq_len
    layout_factor: int  # 2 for TiDAR ([clean | draft]), 1 for AR
    micro_batch: int
    world_size: int
    zero_stage: int
    precision: str  # bf16 | fp32
    expert_parallel: int = 1
    sequence_parallel: int = 1
    activation_checkpointing: bool = True
    loss_chunk_tokens: int | None = None
    attn_implementation: str = "flex_attention"
    scores_materialized: bool = False  # eager, or SDPA on CPU

    @property
    def layout_len(self) -> int:
        return self.seq_len * self.layout_factor


@dataclass
class MemoryPlan:
    """Bytes per rank by term; `alternatives` holds the activation/logit terms for the other settings."""

    terms: dict[str, float]
    alternatives: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.terms.values())


def _states(m: ModelShape, t: TrainShape) -> dict[str, float]:
    dtype = DTYPE_BYTES[t.precision]
    local = (m.total_params - m.expert_params) + m.expert_params / t.expert_parallel
    shards = t.world_size
    weights = local * dtype if t.zero_stage < 3 else m.total_params / shards * dtype
    grads = local * dtype if t.zero_stage < 2 else m.total_params / shards * dtype
    optimizer = 16 * m.total_params / shards if t.zero_stage >= 1 else 2 * dtype * local
    if t.zero_stage == 3:
        buffers = (BUCKET_ELEMENTS + min(ZERO3_MAX_LIVE, 2 * m.largest_layer_params)) * dtype
    elif t.zero_stage >= 1:
        buffers = 2 * BUCKET_ELEMENTS * dtype
    else:
        buffers = 0.0
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "buffers": buffers}


def activation_bytes(m: ModelShape, t: TrainShape, checkpointing: bool,
                     coef: ActivationCoefficients = ActivationCoefficients()) -> float:
    """Activations kept for backward (plus attention scores where materialised), per rank."""
    dtype = DTYPE_BYTES[t.precision]
    tokens = t.micro_batch * t.layout_len / t.sequence_parallel
    per_layer = tokens * dtype * (coef.hidden * m.hidden_size + coef.attn * m.qkv_width + coef.mlp * m.mlp_width)
    scores = 0.0
    if t.scores_materialized:
        heads = m.num_query_heads / t.sequence_parallel
        scores = t.micro_batch * heads * t.layout_len ** 2 * 4
    if checkpointing:
        return m.num_layers * tokens * m.hidden_size * dtype + per_layer + scores
    return m.num_layers * (per_layer + scores)


def logit_bytes(m: ModelShape, t: TrainShape, chunk_tokens: int | None) -> float:
    """The head's logits, their fp32 upcast and gradient: all positions at once, or one chunk at a time."""
    dtype = DTYPE_BYTES[t.precision]
    tokens = t.micro_batch * t.layout_len / t.sequence_parallel
    if chunk_tokens:
        tokens = min(tokens, chunk_tokens)
    return tokens * m.vocab_size * (dtype + 4 + 4)


def mask_bytes(t: TrainShape) -> float:
    """The attention mask of one micro batch (full rows on every rank)."""
    T = t.layout_len
    if t.attn_implementation == "flex_attention":
        tiles = (-(-T // FLEX_TILE)) ** 2
        return t.micro_batch * (tiles * 4 * (4 + 4 + 1 + 1) + T * 8 * 10)
    pairs = T * T
    if t.attn_implementation == "sdpa" and t.layout_factor == 2 and t.sequence_parallel == 1:
        # the split SDPA of the training layout: S x S clean + at most S x 2S draft pairs
        pairs = T * T * 3 // 4
    return t.micro_batch * pairs * (DENSE_BYTES_PER_PAIR + DTYPE_BYTES[t.precision])  # predicate + additive mask


def plan_memory(m: ModelShape, t: TrainShape) -> MemoryPlan:
    """Per-rank bytes of the configuration `t` for model `m`, with the other activation/logit settings beside."""
    terms = _states(m, t)
    terms["activations"] = activation_bytes(m, t, t.activation_checkpointing)
    terms["logits"] = logit_bytes(m, t, t.loss_chunk_tokens)
    terms["mask"] = mask_bytes(t)
    alternatives = {
        "activations (checkpointing)": activation_bytes(m, t, True),
        "activations (no checkpointing)": activation_bytes(m, t, False),
        f"logits (chunks of {t.loss_chunk_tokens or 4096})": logit_bytes(m, t, t.loss_chunk_tokens or 4096),
        "logits (unchunked)": logit_bytes(m, t, None),
    }
    return MemoryPlan(terms, alternatives)
