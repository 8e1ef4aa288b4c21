"""TiDAR-aware Ulysses sequence parallelism, built from DeepSpeed's parts.

DeepSpeed's HF integration (`UlyssesSPAttentionHF.register_with_transformers`) cannot carry the TiDAR mask: its
wrapper turns a dense mask into None and rebuilds a BlockMask as plain causal (tests/test_sequence_parallel.py
shows it). So ar2diff uses the pieces instead:

- the sequence-parallel groups of `deepspeed.runtime.sequence_parallel.parallel_state_sp`, handed to
  `deepspeed.initialize` as `mpu` (ZeRO then shards and reduces over the sequence-data-parallel group);
- one `UlyssesSPAttentionHF` per model (its all-to-all: sequence-sharded q/k/v in, head-sharded full sequence to
  the core attention, back out) behind an attention function registered under its own name (`ATTN_KEY`), which
  leaves transformers' "sdpa"/"flex_attention" entries alone;
- the core attention run in layout order (`in_layout_order`: q/k/v permuted from the gathered rank order), so the
  TiDAR mask is the unsharded row's, built once per micro-batch by `ar2diff.objective.sharded` and passed through
  the model's own `attention_mask` argument, untouched by the wrapper;
- the local position ids, passed as a model keyword (ZAYA does not hand `position_ids` to its layers).

The loss each rank returns is its share of the unsharded loss; `loss_scale` turns it into what `engine.backward`
needs under the ZeRO stage's gradient reduction, and `reduce_logged` sums logged shares over the group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ar2diff.model.sequence_shard import (  # noqa: F401 (reduce_logged: re-exported)
    POSITIONS_KWARG, SequenceParallel, plan_shard, reduce_logged)

ATTN_KEY = "ar2diff_ulysses"
CORE_IMPLS = ("sdpa", "flex_attention")
_ULYSSES_ATTR = "_ar2diff_ulysses"


def sequence_parallel_mpu(size: int):
    """DeepSpeed's sequence-parallel state module with groups of `size` consecutive ranks (idempotent)."""
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

    if mpu._SEQUENCE_PARALLEL_GROUP is not None:
        if mpu.get_sequence_parallel_world_size() == size:
            return mpu
        mpu._release_sequence_parallel_groups()
    mpu.initialize_sequence_parallel(sequence_parallel_size=size)
    return mpu


def check_heads(config, size: int) -> None:
    """Ulysses scatters heads: P must divide the query heads; KV heads are split, or replicated above their count."""
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if heads % size:
        raise ValueError(f"deepspeed.sequence_parallel_size={size} must divide the model's {heads} query heads")
    if kv % size and size % kv:
        raise ValueError(f"deepspeed.sequence_parallel_size={size} and the model's {kv} key/value heads must divide "
                         "one another (DeepSpeed Ulysses splits or replicates them)")


def _ulysses_attention(module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: the module's UlyssesSPAttentionHF around the core attention, with the
    TiDAR mask of the gathered sequence passed through unchanged."""
    uattn = module.__dict__.get(_ULYSSES_ATTR)
    if uattn is None or POSITIONS_KWARG not in kwargs:
        raise RuntimeError(f"attention implementation {ATTN_KEY!r} runs only inside a sequence-parallel TiDAR "
                           "forward (ar2diff.model.sequence_shard)")
    kwargs["position_ids"] = kwargs.pop(POSITIONS_KWARG)
    _fit_batch(uattn, query.shape[0])
    return uattn(module, query, key, value, attention_mask, **kwargs)


def _fit_batch(uattn, batch: int) -> None:
    """UlyssesSPAttentionHF checks shapes against the batch size it was built for; follow the micro-batch's."""
    if uattn.batch_size != batch:
        uattn.batch_size = batch
        uattn.required_query_shape = torch.Size([1, batch, *uattn.required_query_shape[2:]])
        uattn.required_key_value_shape = torch.Size([1, batch, *uattn.required_key_value_shape[2:]])
        uattn.required_context_shape = torch.Size([1, batch, *uattn.required_context_shape[2:]])


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_KEY, _ulysses_attention)


def install_sequence_parallel(model, group, micro_batch_size: int = 1) -> SequenceParallel:
    """Make a TidarObjective compute its rank's share of rows sharded over `group` (see the module docstring).

    The model's own attention implementation ("sdpa" or "flex_attention") becomes the core attention on the
    gathered sequence; the model config's implementation is switched to `ATTN_KEY`.
    """
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    if getattr(model, "kind", None) != "tidar":
        raise ValueError("deepspeed.sequence_parallel_size > 1 needs objective.kind=tidar (AR pretraining is not "
                         "sharded)")
    config = model.lm.config
    core = config._attn_implementation
    if core == ATTN_KEY:
        return model.sequence_parallel
    if core not in CORE_IMPLS:
        raise ValueError(f"model.attn_implementation={core!r} cannot run under sequence parallelism; use one of "
                         f"{CORE_IMPLS}")
    size = dist.get_world_size(group)
    check_heads(config, size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    uattn = UlyssesSPAttentionHF(
        attn=in_layout_order(_core_function(core), size), batch_size=micro_batch_size, attn_head_count=config.num_attention_heads,
        attn_head_size=head_dim,
        kv_head_count=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        num_hidden_layers=config.num_hidden_layers, process_group=group, seq_length_is_variable=True)
    n_layers = 0
    for module in model.lm.modules():
        if hasattr(module, "o_proj") and hasattr(module, "layer_idx"):  # an HF attention layer
            module.__dict__[_ULYSSES_ATTR] = uattn
            n_layers += 1
    if n_layers != config.num_hidden_layers:
        raise RuntimeError(f"found {n_layers} attention layers in {type(model.lm).__name__}, expected "
                           f"{config.num_hidden_layers}; sequence parallelism cannot wrap this architecture")
    _register()
    model.lm.set_attn_implementation(ATTN_KEY)
    model.sequence_parallel = SequenceParallel(group=group, rank=dist.get_rank(group), size=size, core_impl=core)
    return model.sequence_parallel


def in_layout_order(core, size: int):
    """`core` (an attention function) run on the row in layout order `[clean | draft]`: the all-to-all gathers the
    sequence in rank order `[clean_0 | draft_0 | clean_1 | draft_1 | ...]`, so q/k/v (and position ids) are
    permuted into layout order before `core` and its output back after. The mask is then the unsharded row's: the
    flex BlockMask keeps its run form (one clean run per document, built in O(L) at any length), and SDPA gets the
    split plan that skips the empty blocks. A permutation of the sequence axis: its gradient is the inverse one, for
    any core (checked with SDPA, which has a CPU backward, in tests/test_sequence_parallel.py)."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        to_layout, to_gathered = gathered_order(query.shape[2], size, query.device)
        query, key, value = (t.index_select(2, to_layout) for t in (query, key, value))
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"].index_select(1, to_layout)
        out, weights = core(module, query, key, value, attention_mask, **kwargs)
        return out.index_select(1, to_gathered), weights  # HF attention output: (B, L, H, D)

    return attention


_ORDERS: dict = {}


def gathered_order(length: int, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(to_layout, to_gathered) index vectors of a gathered 2S-long sequence of `size` ranks: x_gathered[to_layout]
    is in layout order, x_layout[to_gathered] in gathered order (`plan_shard`'s gathered_idx)."""
    key = (length, size, str(device))
    if key not in _ORDERS:
        to_gathered = plan_shard(length // 2, 0, size).gathered_idx.to(device)
        _ORDERS[key] = (torch.argsort(to_gathered), to_gathered)
    return _ORDERS[key]


def _core_function(core: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[core]


def loss_scale(zero_stage: int, reduce_scatter: bool, size: int) -> float:
    """The factor each rank's loss share is multiplied by before `engine.backward`, so that the reduced gradient is
    that of the unsharded loss (averaged over data parallelism).

    DeepSpeed divides the gradient sum over all ranks by the data-parallel size for ZeRO-0/1/2 (a sum over the
    sequence-parallel group) and by the whole world for ZeRO-3 with reduce-scatter (a mean over it); ZeRO-3 with
    `reduce_scatter: false` sums again. Measured for every case in tests/test_sequence_parallel.py.
    """
    return float(size) if zero_stage == 3 and reduce_scatter else 1.0


def sequence_parallel_setup(model, size: int, micro_batch_size: int):
    """For `build_engine`: None when `size` is 1; else the groups (DeepSpeed's `mpu`) with `model` installed on them."""
    if size == 1:
        return None
    if not hasattr(model, "sequence_parallel"):
        raise ValueError(f"deepspeed.sequence_parallel_size={size} needs a TidarObjective (TiDAR training); got "
                         f"{type(model).__name__}")
    mpu = sequence_parallel_mpu(size)
    install_sequence_parallel(model, mpu.get_sequence_parallel_group(), micro_batch_size)
    return mpu
