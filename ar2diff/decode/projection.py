"""Roofline projection of TiDAR decoding speedup over AR decoding on an accelerator.

The CPU reference decoder measures tokens per forward (TPF) and an acceptance-length histogram, not
accelerator wall-clock. This module turns a measured histogram into a projected speedup with a roofline
cost model, so a run on a small model can be read as "what this acceptance would buy on an MI300X".

Cost model (one forward of T input tokens over a batch of b sequences, each with a KV cache of C tokens):
- time = max(compute time, memory time): the forward is as slow as its slower roofline side; overlap is
  perfect and kernels reach peak (an optimistic bound for both AR and TiDAR, so the ratio is what matters).
- compute FLOPs = 2 * active_params * T  +  4 * L * attn_width * C * T, where attn_width = query heads *
  head dim (hidden size when query heads are not given): a matmul-FLOP count, QK^T and PV against the C
  cached keys per layer. Keys inside the forward itself (at most T / b per sequence) are ignored.
- memory bytes = weight bytes touched + KV-cache bytes read (2 * L * kv_heads * head_dim * C * kv_bytes per
  sequence). The KV cache of a sequence is read once per forward however many query tokens it has (fused
  attention); writing the new keys, activations and the logits are ignored.
- weight bytes touched: dense weights always; for an MoE with E routed experts per layer and top-k routing,
  the routed part counts only the experts hit. Assumption: each of the T tokens picks k distinct experts
  uniformly and independently, so the expected number of distinct experts hit per layer is
  E * (1 - (1 - k/E)^T). Real routers are skewed and the tokens of one TiDAR forward (drafts and mask
  templates of one sequence) are correlated, so they hit fewer experts: for a top-1 16-expert model a
  64-token forward hits ~15.7 experts under this assumption and the batch-1 projection can fall below 1.
  Pass `experts_hit` (tokens in the forward -> distinct experts hit per layer, e.g. measured from the
  router) to replace the assumption.
  The routed parameters follow from the totals: per expert (all layers) (total - active) / (E - k), so
  routed = E * that, always-touched = total - routed (attention, router, shared experts, embeddings).
- AR decode: T = b (one token per sequence per forward), it emits b tokens.
- TiDAR decode: T = b * (num_drafts + num_templates * block_size): last step's drafts (verified by the
  causal stream) plus one block of masks per drafted acceptance level. It emits b * TPF tokens, TPF = mean
  accepted drafts + 1 (the bonus / correction token) from the histogram.
- speedup = (TPF / time_tidar) / (1 / time_ar), tokens per second over tokens per second.

Consequences: in the memory-bound regime (small batch, compute cheap) a dense model's speedup tends to TPF;
MoE pays for the extra experts TiDAR's wider forward touches; in the compute-bound regime (large batch,
short context) the speedup falls towards TPF / input tokens per sequence, below 1. At long context the
per-sequence KV reads keep even large-batch AR memory-bound, which delays that fall. Not modelled: launch overheads,
sampling, attention-kernel efficiency, communication for multi-device serving, ZAYA's CCA convolution.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

from ar2diff.model.params import ModelShape

__all__ = [
    "Accelerator",
    "ModelShape",
    "ForwardCost",
    "MI300X",
    "MI355X",
    "H100_SXM",
    "ACCELERATORS",
    "expected_experts_hit",
    "forward_cost",
    "tokens_per_forward",
    "project_speedup",
]


@dataclass(frozen=True)
class Accelerator:
    """Peak dense bf16 matmul FLOP/s and peak HBM bandwidth (bytes/s) of one device."""

    name: str
    peak_bf16_flops: float
    mem_bandwidth_bytes_per_s: float


# Vendor peak numbers, dense (no structured sparsity).
# MI300X: 304 CUs * 2048 bf16 FLOP/clk * 2.1 GHz = 1307.4 TFLOP/s; 5.3 TB/s HBM3.
MI300X = Accelerator("MI300X", 1307.4e12, 5.3e12)
# MI355X: AMD quotes 2.5 PFLOP/s dense bf16 (5 PF dense FP8: ISSCC 2026 gives 256 CUs * 8192 FP8 FLOP/clk,
# bf16 is half that rate, at 2.4 GHz = 2.52 PF); 8 TB/s HBM3E.
MI355X = Accelerator("MI355X", 2.5e15, 8.0e12)
# H100 SXM: 989 TFLOP/s dense bf16 (1979 with sparsity); 3.35 TB/s HBM3.
H100_SXM = Accelerator("H100 SXM", 989e12, 3.35e12)
ACCELERATORS = {a.name: a for a in (MI300X, MI355X, H100_SXM)}


@dataclass(frozen=True)
class ForwardCost:
    """Roofline cost of one forward; time_s = max(compute_s, memory_s)."""

    input_tokens: int
    flops: float
    weight_bytes: float
    kv_bytes: float
    experts_hit_per_layer: float
    compute_s: float
    memory_s: float
    time_s: float
    bound: str


def expected_experts_hit(num_experts: int, experts_per_token: int, num_tokens: int) -> float:
    """E * (1 - (1 - k/E)^T): expected distinct experts hit by T tokens routing top-k uniformly at random."""
    E, k = num_experts, experts_per_token
    return E * (1 - (1 - k / E) ** num_tokens)


def forward_cost(
    model: ModelShape,
    accel: Accelerator,
    tokens_per_seq: int,
    batch: int,
    context: int,
    experts_hit: Callable[[int], float] | None = None,
) -> ForwardCost:
    """Roofline time of one forward of `tokens_per_seq` new tokens for each of `batch` sequences.

    experts_hit: tokens in the forward -> distinct routed experts read per layer; default
    `expected_experts_hit` (uniform independent routing). Ignored for dense models.
    """
    T = tokens_per_seq * batch
    per_token_attn_flops = 4 * model.num_layers * model.attn_width * context
    flops = T * (2 * model.active_params + per_token_attn_flops)
    if model.num_experts == model.experts_per_token:
        hit = float(model.num_experts)
    elif experts_hit is not None:
        hit = float(experts_hit(T))
        if not model.experts_per_token <= hit <= model.num_experts:
            raise ValueError(
                f"experts_hit({T}) returned {hit}; it must lie in [experts_per_token, num_experts] = "
                f"[{model.experts_per_token}, {model.num_experts}]"
            )
    else:
        hit = expected_experts_hit(model.num_experts, model.experts_per_token, T)
    dense_params = model.total_params - model.routed_params
    weight_bytes = model.bytes_per_param * (dense_params + model.routed_params / model.num_experts * hit)
    kv_bytes = batch * 2 * model.num_layers * model.num_kv_heads * model.head_dim * context * model.kv_bytes_per_elem
    compute_s = flops / accel.peak_bf16_flops
    memory_s = (weight_bytes + kv_bytes) / accel.mem_bandwidth_bytes_per_s
    return ForwardCost(
        input_tokens=T,
        flops=flops,
        weight_bytes=weight_bytes,
        kv_bytes=kv_bytes,
        experts_hit_per_layer=hit,
        compute_s=compute_s,
        memory_s=memory_s,
        time_s=max(compute_s, memory_s),
        bound="compute" if compute_s > memory_s else "memory",
    )


def _histogram_counts(histogram: Sequence[float] | Mapping[int, float]) -> dict[int, float]:
    """{drafts accepted: count} from a list (index = drafts accepted) or a mapping, validated."""
    items = histogram.items() if isinstance(histogram, Mapping) else enumerate(histogram)
    counts = {int(n): float(c) for n, c in items}
    if any(n < 0 or c < 0 or not math.isfinite(c) for n, c in counts.items()) or sum(counts.values()) <= 0:
        raise ValueError(
            "histogram must map accepted-draft counts (>= 0) to non-negative counts with a positive total, "
            f"got {counts}"
        )
    return counts


def tokens_per_forward(histogram: Sequence[float] | Mapping[int, float]) -> float:
    """Mean accepted drafts + 1 from an acceptance-length histogram (index or key = drafts accepted)."""
    counts = _histogram_counts(histogram)
    return sum(n * c for n, c in counts.items()) / sum(counts.values()) + 1


def project_speedup(
    histogram: Sequence[float] | Mapping[int, float],
    model: ModelShape,
    accel: Accelerator,
    block_size: int,
    num_templates: int,
    batch: int = 1,
    context: int = 4096,
    num_drafts: int | None = None,
    experts_hit: Callable[[int], float] | None = None,
) -> dict:
    """Projected TiDAR speedup over AR decoding (see the module docstring), with the intermediate numbers.

    histogram: acceptance-length counts (histogram[n] = forwards that accepted n drafts).
    block_size / num_templates: the decoder settings; num_drafts defaults to block_size (drafts verified per
    forward). experts_hit: see `forward_cost`. Returns a JSON-ready dict: tokens_per_forward, input tokens
    per sequence, the AR and TiDAR ForwardCost fields, tokens per second for both, and speedup.
    """
    num_drafts = block_size if num_drafts is None else num_drafts
    minimums = {"block_size": 1, "num_templates": 0, "batch": 1, "context": 0, "num_drafts": 0}
    values = {"block_size": block_size, "num_templates": num_templates, "batch": batch, "context": context,
              "num_drafts": num_drafts}
    for name, low in minimums.items():
        if not isinstance(values[name], int) or values[name] < low:
            raise ValueError(f"project_speedup: {name} must be an int >= {low}, got {values[name]!r}")
    tpf = tokens_per_forward(histogram)
    longest = max(n for n, c in _histogram_counts(histogram).items() if c > 0)
    if longest > num_drafts:
        raise ValueError(
            f"histogram has forwards accepting {longest} drafts but num_drafts is {num_drafts}; pass the "
            "num_drafts (or block_size) the histogram was measured with"
        )
    tidar_tokens_per_seq = num_drafts + num_templates * block_size
    ar = forward_cost(model, accel, 1, batch, context, experts_hit)
    tidar = forward_cost(model, accel, tidar_tokens_per_seq, batch, context, experts_hit)
    ar_tokens_per_s = batch / ar.time_s
    tidar_tokens_per_s = batch * tpf / tidar.time_s
    return {
        "accelerator": accel.name,
        "tokens_per_forward": tpf,
        "tidar_input_tokens_per_seq": tidar_tokens_per_seq,
        "batch": batch,
        "context": context,
        "ar": asdict(ar),
        "tidar": asdict(tidar),
        "ar_tokens_per_s": ar_tokens_per_s,
        "tidar_tokens_per_s": tidar_tokens_per_s,
        "speedup": tidar_tokens_per_s / ar_tokens_per_s,
    }
