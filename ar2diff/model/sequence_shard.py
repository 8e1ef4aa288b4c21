"""The TiDAR training forward with each row sharded over the P ranks of a sequence-parallel (Ulysses) group.

Layout: a row of S tokens is `[clean | draft]` (2S positions, ar2diff.model.layout). Rank r of P holds matching
chunks of both streams: the clean positions [r*n, (r+1)*n) and the same draft positions, n = S/P, as its local
sequence `[clean_r | draft_r]` (2n tokens). Every rank has the whole row's token ids (S integers), so layout records,
targets and token counts are computed for the whole row without communication; only activations are sharded.

Attention: the Ulysses all-to-all (ar2diff.trainer.sequence_parallel) gathers the sequence in rank order,
`[clean_0 | draft_0 | clean_1 | draft_1 | ...]`, and scatters heads. Because `can_attend` is a pure predicate over
`TokenMeta`, the records are simply permuted into that gathered order and the one mask is built from them, once per
micro-batch, and handed to the model like any other mask: every layer uses it.

Loss: each rank returns its share of the unsharded loss,
    L_r = (alpha * sum_{AR, rank r} / N_AR + sum_{diff, rank r} / N_diff) / (1 + alpha) + aux_coef * aux_r,
with N_AR, N_diff the counts of the whole row, so sum_r L_r is exactly the unsharded loss and the sum of the
ranks' gradients is its gradient. How DeepSpeed combines the ranks' gradients (sum or mean over the group) is the
trainer's concern (`ar2diff.trainer.sequence_parallel.loss_scale`). The router balancing loss (Switch, as
transformers' `load_balancing_loss_func`) uses the expert counts of the whole row: aux = E * sum_e f_e * P_e with
f_e the global top-k assignment frequency and P_e the global mean router probability (the same formula in
transformers' Qwen3-MoE, Mixtral and OLMoE); given f (all-reduced, no gradient), aux is linear in the per-rank
probability sums, so each rank's share carries its own tokens' gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ar2diff.model.layout import TidarLayout, TokenMeta, build_tidar_layout, sample_draft_mask
from ar2diff.model.zaya import PREV_KWARG
from ar2diff.model.zaya_halo import HALO_KWARG, Halo, conv_lookback
from ar2diff.objective import ar_targets, chunked_token_ce, combine, diff_targets

# The local position ids travel to the attention wrapper as a keyword of the model call: transformers' ZAYA does not
# pass `position_ids` to its layers, and a keyword also reaches activation-checkpointing recomputes.
POSITIONS_KWARG = "ar2diff_sp_positions"


@dataclass
class SequenceParallel:
    """This rank's place in its sequence-parallel group. `core_impl` is the attention run on the gathered sequence
    ("sdpa" or "flex_attention"); it decides the mask's form."""

    group: object
    rank: int
    size: int
    core_impl: str = "sdpa"


@dataclass
class ShardPlan:
    """Index arithmetic of one rank's shard (all indices into the 2S layout)."""

    local_idx: torch.Tensor  # (2n,): clean chunk then draft chunk
    gathered_idx: torch.Tensor  # (2S,): the layout index at each position of the all-to-all's gathered order
    halo_idx: torch.Tensor  # (2h,): layout indices of the halo tokens from rank r-1 (-1: none, rank 0)


def plan_shard(seq_len: int, rank: int, size: int, halo: int = 0) -> ShardPlan:
    if seq_len % size:
        raise ValueError(f"data.seq_len={seq_len} is not divisible by deepspeed.sequence_parallel_size={size}")
    n = seq_len // size
    if halo > n:
        raise ValueError(f"each sequence-parallel shard holds {n} positions per stream, fewer than the ZAYA "
                         f"convolution look-back {halo}: lower deepspeed.sequence_parallel_size")

    def chunk(r: int) -> torch.Tensor:
        clean = torch.arange(r * n, (r + 1) * n)
        return torch.cat([clean, clean + seq_len])

    before = torch.arange(rank * n - halo, rank * n)
    halo_clean = torch.where(before >= 0, before, -1)
    halo_draft = torch.where(before >= 0, before + seq_len, -1)
    return ShardPlan(local_idx=chunk(rank), gathered_idx=torch.cat([chunk(r) for r in range(size)]),
                     halo_idx=torch.cat([halo_clean, halo_draft]))


def _take(meta: TokenMeta, idx: torch.Tensor) -> TokenMeta:
    return TokenMeta(*(getattr(meta, f)[:, idx] for f in TokenMeta.fields()))


def extended_prev(layout: TidarLayout, plan: ShardPlan) -> torch.Tensor:
    """(B, 2h + 2n) stream predecessors in the coordinates `[halo | local]` the ZAYA adapter indexes (-1: none)."""
    ext_idx = torch.cat([plan.halo_idx, plan.local_idx]).to(layout.prev_BL.device)
    position_of = torch.full((layout.prev_BL.shape[1],), -1, dtype=torch.long, device=ext_idx.device)
    present = ext_idx >= 0
    position_of[ext_idx[present]] = torch.arange(ext_idx.numel(), device=ext_idx.device)[present]
    prev_global = layout.prev_BL[:, ext_idx.clamp(min=0)]
    prev_global = torch.where(present, prev_global, -1)
    return torch.where(prev_global >= 0, position_of[prev_global.clamp(min=0)], -1)


def _reduced(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """Sum over the sequence-parallel group, no gradient (counts)."""
    x = x.detach().clone()
    if sp.size > 1:
        dist.all_reduce(x, group=sp.group)
    return x


def balancing_share(router_logits, valid_BT: torch.Tensor, num_experts: int, top_k: int,
                    sp: SequenceParallel) -> torch.Tensor:
    """This rank's share of the Switch balancing loss over the whole row (see the module docstring)."""
    mask = valid_BT.reshape(-1).float()
    counts = torch.zeros(num_experts, device=mask.device)
    prob_sum = torch.zeros(num_experts, device=mask.device)
    for layer_logits in router_logits:
        probs = F.softmax(layer_logits.float(), dim=-1)
        _, chosen = torch.topk(probs, top_k, dim=-1)
        counts = counts.scatter_add(0, chosen.reshape(-1), mask.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * mask[:, None]).sum(0)
    total = _reduced(torch.stack([mask.sum() * len(router_logits)]), sp)[0]
    counts = _reduced(counts, sp)
    return num_experts * (counts / total * prob_sum / total).sum()


def _stream_share(hidden_NH, labels_N, head, chunk_size: int | None, total: int) -> torch.Tensor:
    """sum of this rank's token losses / the whole row's count (0 with a graph when there is nothing to count)."""
    if total == 0 or hidden_NH.shape[0] == 0:
        return hidden_NH.sum() * 0.0
    if chunk_size:
        ce = chunked_token_ce(hidden_NH, labels_N, head, chunk_size)
    else:
        ce = F.cross_entropy(head(hidden_NH).float(), labels_N, reduction="none")
    return ce.sum() / total


def sharded_tidar_forward(model, sp: SequenceParallel, input_ids, doc_ids=None, position_ids=None, loss_mask=None,
                          generator=None, return_logits: bool = False):
    """`TidarLM.forward` for one rank of a sequence-parallel group: returns this rank's loss share (a TidarOutput
    whose terms and token counts are shares too, so summing them over the group gives the row's values)."""
    from ar2diff.model.tidar import TidarOutput

    if return_logits:
        raise ValueError("return_logits is not available under sequence parallelism (each rank holds a shard of the "
                         "row); run the forward without deepspeed.sequence_parallel_size")
    model.check_input(input_ids)
    B, S = input_ids.shape
    doc_ids = torch.zeros_like(input_ids) if doc_ids is None else doc_ids.long()
    loss_mask = torch.ones_like(input_ids, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
    draft_mask = sample_draft_mask((B, S), model.mask_ratio, generator, device=input_ids.device)
    layout = build_tidar_layout(input_ids, model.mask_token_id, model.block_size, doc_ids, position_ids, draft_mask)
    lookback = conv_lookback(model.lm) if model.has_adapter else 0
    plan = plan_shard(S, sp.rank, sp.size, halo=lookback)
    local = plan.local_idx.to(input_ids.device)
    gathered_meta = _take(layout.meta, plan.gathered_idx.to(input_ids.device))
    positions_BT = layout.position_ids_BL[:, local]
    kwargs = {POSITIONS_KWARG: positions_BT}
    if model.has_adapter:
        send = torch.cat([torch.arange(S // sp.size - lookback, S // sp.size),
                          torch.arange(2 * S // sp.size - lookback, 2 * S // sp.size)]).to(input_ids.device)
        kwargs[PREV_KWARG] = extended_prev(layout, plan)
        kwargs[HALO_KWARG] = Halo(sp.group, sp.rank, sp.size, send)
    if model.balancing_loss_fn is not None:
        kwargs["output_router_logits"] = True
    out = model.lm.base_model(input_ids=layout.input_ids_BL[:, local], position_ids=positions_BT,
                              attention_mask=model._mask_argument(gathered_meta, gathered_meta, impl=sp.core_impl),
                              use_cache=False, **kwargs)
    hidden_BTH = out.last_hidden_state
    aux = None
    if model.balancing_loss_fn is not None:
        n_experts = getattr(model.config, "num_experts", None) or model.config.num_local_experts
        aux = balancing_share(out.router_logits, layout.meta.doc[:, local] >= 0, n_experts,
                              model.config.num_experts_per_tok, sp)

    n = S // sp.size
    chunk = slice(sp.rank * n, (sp.rank + 1) * n)
    ar_labels, ar_valid = ar_targets(input_ids, doc_ids, loss_mask)
    diff_labels, diff_valid = diff_targets(input_ids, doc_ids, loss_mask, draft_mask)
    n_ar, n_diff = int(ar_valid.sum()), int(diff_valid.sum())
    head = model.lm.get_output_embeddings()
    ar_valid, diff_valid = ar_valid[:, chunk], diff_valid[:, chunk]
    ar = _stream_share(hidden_BTH[:, :n][ar_valid], ar_labels[:, chunk][ar_valid], head, model.loss_chunk_size, n_ar)
    diff = _stream_share(hidden_BTH[:, n:][diff_valid], diff_labels[:, chunk][diff_valid], head,
                         model.loss_chunk_size, n_diff)
    terms = combine(ar, diff, model.alpha, aux, model.aux_coef, int(ar_valid.sum()), int(diff_valid.sum()))
    return TidarOutput(loss=terms.loss, terms=terms, layout=layout)
