"""Per-rank memory of a training configuration, before launch: pure arithmetic over the model's shape.

Every term derives from shapes and dtypes (Ψ = parameters, N = ranks that ZeRO partitions over, T = the layout
positions a rank holds: 2S/P for TiDAR, S for AR, b the micro batch, h the hidden size, q/kv the query and
key/value widths, V the vocabulary). Two phases peak apart: the forward and backward hold the activations, logits
and mask; the optimizer step holds its temporaries; both hold the resident states. The plan is the larger phase.

Resident:
- weights: Ψ_local * dtype (ZeRO-3: Ψ/N, plus the gathered live parameters of the layers being computed);
  Ψ_local = dense params + expert params / EP.
- gradients: Ψ_local * dtype (ZeRO >= 2: / N), from the backward to the step.
- optimizer: ZeRO >= 1: fp32 master copy and Adam's two moments, 12 B * Ψ / N (the expert shards are partitioned
  over the N/EP expert-data-parallel ranks, which gives the same total); ZeRO-0: the two moments in the parameter
  dtype.
- buffers: DeepSpeed's reduce (and, ZeRO-1/2, all-gather) buckets of 5e8 elements each; on CPU, where memory is
  counted as pages touched, only as much of each as the gradients fill.
Forward and backward:
- activations: per layer and token, the tensors autograd saves (`layer_activation_elements`, read off each
  architecture's modules: the residual stream and norms, q/k norms, the MLP or the routed experts with their
  gathered inputs, ZAYA's CCA convolution windows and router MLP) plus those of the attention kernel
  (`attention_elements`: q, k, v and outputs as the implementation keeps them; the split SDPA also keeps its key
  copies per run of draft queries). With activation checkpointing only each layer's input is kept. On top of the
  kept activations and the mask the forward and backward peak either in the loss (logits, teacher logits) or in
  one layer's backward (`layer backward`: the layer's saved set, recomputed under checkpointing, while its
  gradients replace it), never both: the loss's memory is gone before the layers' backward starts. Sequence
  activations are divided by P (Ulysses shards the sequence; attention sees all positions with heads / P, the
  same size).
- attention scores: only where a kernel materialises them (eager): b*heads*T^2 per layer.
- logits: the rows that count (AR targets: S; draft targets: mask_ratio * S; both / P): the fp32 log-softmax of
  every row is kept for the backward (4 B), plus, for the larger stream, its logits (parameter dtype), the
  log-softmax kernel's working copy and the gradient (4 B each). With `objective.loss_chunk_tokens` one chunk at
  a time (recomputed in the backward).
- teacher logits (`objective.diff_target` ar | mix): the AR distribution over the draft rows, in the parameter
  dtype and as fp32 probabilities kept for the backward; chunked like the logits.
- mask: flex BlockMask tiles (`ar2diff.model.flex_mask`: O(T + (T/128)^2)); SDPA/eager: the additive float mask
  b*T^2 (the split SDPA of the TiDAR layout keeps only its pieces: S^2 for the clean queries plus each run's
  columns). The mask covers the full row on every rank (not divided by P).
Optimizer step:
- the fp32 gradient partition DeepSpeed assembles (4 B * Ψ / N, ZeRO >= 1) and torch AdamW's temporaries for the
  denominator: two tensors the size of the largest parameter group on CPU (the single-tensor kernel), one with the
  foreach kernel accelerators use. DeepSpeed flattens each group (ZeRO >= 1); without it (ZeRO-0) the CPU kernel
  goes tensor by tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ar2diff.model.params import ModelShape
from ar2diff.model.split_attention import draft_groups

GiB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp32": 4, "bfloat16": 2, "float32": 4}
BUCKET_ELEMENTS = 5e8  # DeepSpeed's default reduce_bucket_size and allgather_bucket_size
ZERO3_MAX_LIVE = 1e9  # DeepSpeed's default stage3_max_live_parameters
FLEX_TILE = 128


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
    diff_target: str = "data"  # objective.diff_target: ar | mix add the AR teacher's distribution
    device: str = "accelerator"  # cpu | accelerator: which kernels run (torch AdamW's step), how memory counts
    mask_ratio: float = 1.0  # objective.mask_ratio: the share of draft positions with a diffusion target
    block_size: int = 16  # objective.block_size (the split SDPA's key columns)

    @property
    def layout_len(self) -> int:
        return self.seq_len * self.layout_factor


STATE_TERMS = ("weights", "gradients", "optimizer", "buffers")
KEPT_TERMS = ("activations", "mask")  # held from the forward through the backward
LOSS_TERMS = ("logits", "teacher logits")  # the loss's forward and backward, before any layer's backward
BACKWARD_TERMS = ("layer backward",)  # one layer's backward (and recompute), after the loss's memory is freed
STEP_TERMS = ("optimizer step",)


@dataclass
class MemoryPlan:
    """Bytes per rank by term; `alternatives` holds the activation/logit terms for the other settings.

    The states (weights, gradients, optimizer, buffers) are resident. The forward and backward keep the activations
    and the mask, and on top of them peak either in the loss (logits, teacher logits) or in one layer's backward,
    never both: the loss's memory is freed before the layers' backward starts. The optimizer step's temporaries
    come after the activations are gone. The plan is the larger phase."""

    terms: dict[str, float]
    alternatives: dict[str, float] = field(default_factory=dict)

    def _sum(self, names) -> float:
        return sum(self.terms.get(k, 0.0) for k in names)

    @property
    def states(self) -> float:
        return self._sum(STATE_TERMS)

    @property
    def forward_backward(self) -> float:
        return self.states + self._sum(KEPT_TERMS) + max(self._sum(LOSS_TERMS), self._sum(BACKWARD_TERMS))

    @property
    def step(self) -> float:
        return self.states + self._sum(STEP_TERMS)

    @property
    def total(self) -> float:
        return max(self.forward_backward, self.step)


def _states(m: ModelShape, t: TrainShape) -> dict[str, float]:
    dtype = DTYPE_BYTES[t.precision]
    local = (m.total_params - m.expert_params) + m.expert_params / t.expert_parallel
    shards = t.world_size
    weights = local * dtype if t.zero_stage < 3 else m.total_params / shards * dtype
    grads = local * dtype if t.zero_stage < 2 else m.total_params / shards * dtype
    optimizer = 12 * m.total_params / shards if t.zero_stage >= 1 else 2 * dtype * local
    filled = local if t.device == "cpu" else float("inf")  # on CPU a bucket's untouched pages cost nothing
    if t.zero_stage == 3:
        buffers = (min(BUCKET_ELEMENTS, filled) + min(ZERO3_MAX_LIVE, 2 * m.largest_layer_params)) * dtype
    elif t.zero_stage >= 1:
        buffers = 2 * min(BUCKET_ELEMENTS, filled) * dtype
    else:
        buffers = 0.0
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "buffers": buffers}


def optimizer_step_bytes(m: ModelShape, t: TrainShape) -> float:
    """The step's temporaries: DeepSpeed's fp32 gradient partition and torch AdamW's denominator temporaries."""
    dtype = DTYPE_BYTES[t.precision]
    temporaries = 2 if t.device == "cpu" else 1  # single-tensor kernel: sqrt, then its quotient; foreach: one
    if t.zero_stage >= 1:  # one flat fp32 tensor per parameter group; the matrices' group is nearly all of Ψ
        return 4 * m.total_params / t.world_size * (1 + temporaries)
    if t.device == "cpu":
        return temporaries * m.largest_tensor_params * dtype
    return temporaries * m.total_params * dtype


def split_key_columns(t: TrainShape) -> float:
    """Key columns the split SDPA gathers over its runs of draft queries (`ar2diff.model.split_attention`): run i of
    g covers draft rows [i r, (i+1) r), r = S/g, and reads the clean prefix up to its end and the drafts of its
    blocks, S (g + 1) / 2 + S + g * block in all."""
    S, g = t.seq_len, draft_groups(t.seq_len)
    return S * (g + 1) / 2 + S + g * t.block_size


def uses_split_sdpa(t: TrainShape) -> bool:
    return t.attn_implementation == "sdpa" and t.layout_factor == 2


def attention_elements(m: ModelShape, t: TrainShape) -> float:
    """Elements per token and layer the attention kernel keeps for the backward (see the module docstring)."""
    q, kv = (m.num_query_heads or 0) * m.head_dim, m.num_kv_heads * m.head_dim
    if t.attn_implementation == "flex_attention":
        return 2 * q + 2 * kv  # q, k, v, output (flex takes grouped keys as they are)
    if uses_split_sdpa(t):  # q, output; the clean call's keys and values repeated to the query heads; each run's
        return 2 * q + (2 * q * t.seq_len + 2 * q * split_key_columns(t)) / t.layout_len  # gathered copies
    return 4 * q  # SDPA, eager: q, and k, v repeated to the query heads, output


def layer_activation_elements(m: ModelShape, t: TrainShape) -> float:
    """Elements per token of one decoder layer's saved tensors outside the attention kernel."""
    h, q, kv = m.hidden_size, (m.num_query_heads or 0) * m.head_dim, m.num_kv_heads * m.head_dim
    if m.model_type == "zaya":
        channels, window = q + kv, m.cca_window + 1  # CCA convolves q and k together over a window of positions
        cca = (2 * window + 2) * channels  # padded and gathered inputs, windows, the depthwise convolution's output
        router = 9 * m.router_hidden + m.num_experts + 1  # the router MLP, its logits over experts + the skip expert
        return 12 * h + cca + q + 2 * kv + router + 3 * m.mlp_width
    extra = 2 * (q + kv) if m.qk_norm else 0  # inputs and outputs of the per-head q/k norms
    if m.num_experts > 1:  # routed: each of the k experts keeps its gathered input and its MLP tensors
        return 7 * h + extra + m.experts_per_token * h + 4 * m.mlp_width + m.num_experts
    return 7 * h + extra + 4 * m.mlp_width


def layer_bytes(m: ModelShape, t: TrainShape) -> float:
    """One layer's saved tensors on this rank (plus its attention scores where a kernel materialises them)."""
    dtype = DTYPE_BYTES[t.precision]
    tokens = t.micro_batch * t.layout_len / t.sequence_parallel
    per_layer = tokens * dtype * (layer_activation_elements(m, t) + attention_elements(m, t))
    if t.attn_implementation == "eager":
        per_layer += t.micro_batch * (m.num_query_heads or 1) / t.sequence_parallel * t.layout_len ** 2 * dtype
    return per_layer


def activation_bytes(m: ModelShape, t: TrainShape, checkpointing: bool) -> float:
    """Activations kept from the forward for the backward, per rank: every layer's saved tensors, or with
    checkpointing every layer's input (a layer's set then exists only while it is recomputed: `layer backward`)."""
    if checkpointing:
        return m.num_layers * t.micro_batch * t.layout_len / t.sequence_parallel * m.hidden_size \
            * DTYPE_BYTES[t.precision]
    return m.num_layers * layer_bytes(m, t)


def logit_rows(t: TrainShape) -> tuple[float, float]:
    """(AR rows, draft rows) that go through the head on this rank (AR: only AR rows)."""
    rows = t.micro_batch * t.seq_len / t.sequence_parallel
    return rows, (rows * t.mask_ratio if t.layout_factor == 2 else 0.0)


def logit_bytes(m: ModelShape, t: TrainShape, chunk_tokens: int | None) -> float:
    """The loss's logit memory at its peak: the fp32 log-softmax kept for every counted row, plus for the larger
    stream its logits (parameter dtype), the log-softmax kernel's working copy and the gradient (fp32 each). With
    chunks: one chunk's logits, log-softmax, working copy and gradient (recomputed in the backward)."""
    dtype = DTYPE_BYTES[t.precision]
    ar, draft = logit_rows(t)
    if chunk_tokens:
        return min(chunk_tokens, max(ar, draft)) * m.vocab_size * (dtype + 12)
    return (ar + draft) * m.vocab_size * 4 + max(ar, draft) * m.vocab_size * (dtype + 8)


def teacher_bytes(m: ModelShape, t: TrainShape, chunk_tokens: int | None) -> float:
    """diff_target ar | mix: the teacher's logits (parameter dtype) and fp32 probabilities over the draft rows (one
    chunk's with chunks)."""
    if t.diff_target == "data" or t.layout_factor != 2:
        return 0.0
    rows = logit_rows(t)[1]
    if chunk_tokens:
        rows = min(rows, chunk_tokens)
    return rows * m.vocab_size * (DTYPE_BYTES[t.precision] + 4)


def mask_bytes(t: TrainShape) -> float:
    """The attention mask of one micro batch (full rows on every rank)."""
    T = t.layout_len
    if t.attn_implementation == "flex_attention":
        tiles = (-(-T // FLEX_TILE)) ** 2
        return t.micro_batch * (tiles * 4 * (4 + 4 + 1 + 1) + T * 8 * 10)
    pairs = T * T
    if uses_split_sdpa(t):  # the clean queries' S x S, each run's rows by its gathered columns
        pairs = t.seq_len ** 2 + t.seq_len / draft_groups(t.seq_len) * split_key_columns(t)
    return t.micro_batch * pairs * DTYPE_BYTES[t.precision]


def plan_memory(m: ModelShape, t: TrainShape) -> MemoryPlan:
    """Per-rank bytes of the configuration `t` for model `m`, with the other activation/logit settings beside."""
    terms = _states(m, t)
    terms["activations"] = activation_bytes(m, t, t.activation_checkpointing)
    terms["logits"] = logit_bytes(m, t, t.loss_chunk_tokens)
    terms["teacher logits"] = teacher_bytes(m, t, t.loss_chunk_tokens)
    terms["mask"] = mask_bytes(t)
    terms["layer backward"] = layer_bytes(m, t)
    terms["optimizer step"] = optimizer_step_bytes(m, t)
    alternatives = {
        "activations (checkpointing)": activation_bytes(m, t, True),
        "activations (no checkpointing)": activation_bytes(m, t, False),
        f"logits (chunks of {t.loss_chunk_tokens or 4096})": logit_bytes(m, t, t.loss_chunk_tokens or 4096),
        "logits (unchunked)": logit_bytes(m, t, None),
    }
    return MemoryPlan(terms, alternatives)
