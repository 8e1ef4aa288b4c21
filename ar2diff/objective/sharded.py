"""The TiDAR objective with each row sharded over the P ranks of a sequence-parallel (Ulysses) group.

Which positions a rank holds, and the attention over the gathered order, are ar2diff.model.sequence_shard's; this
module computes the rank's share of the loss.

Loss: each rank returns its share of the unsharded loss,
    L_r = (alpha * sum_{AR, rank r} / N_AR + sum_{diff, rank r} / N_diff) / (1 + alpha) + aux_coef * aux_r,
with N_AR, N_diff the counts of the whole row, so sum_r L_r is exactly the unsharded loss and the sum of the
ranks' gradients is its gradient. How DeepSpeed combines the ranks' gradients (sum or mean over the group) is the
trainer's concern (`ar2diff.trainer.sequence_parallel.loss_scale`). The router balancing loss (Switch, as
transformers' `load_balancing_loss_func`) uses the expert counts of the whole row: aux = E * sum_e f_e * P_e with
f_e the global top-k assignment frequency and P_e the global mean router probability (the same formula in
transformers' Qwen3-MoE, Mixtral and OLMoE); given f (all-reduced, no gradient), aux is linear in the per-rank
probability sums, so each rank's share carries its own tokens' gradient.

Drafter-verifier alignment (`objective.diff_target` ar | mix): the AR teacher of the draft at position i is the clean
hidden state at i-1. A rank holds both streams of positions [r*n, (r+1)*n), so it has every teacher but the one of
its first draft, which is the previous rank's last clean row: each rank all-gathers that one row per batch row
(detached, as the teacher is a stop-gradient) and takes its predecessor's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ar2diff.model.layout import build_tidar_layout, sample_draft_mask
from ar2diff.model.sequence_shard import POSITIONS_KWARG, SequenceParallel, extended_prev, plan_shard
from ar2diff.model.zaya import PREV_KWARG
from ar2diff.model.zaya_halo import HALO_KWARG, Halo, halo_length
from ar2diff.objective.losses import TidarOutput, ar_targets, diff_targets, hybrid_terms, teacher_rows


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


def previous_rank_row(row_BH: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """The previous rank's `row_BH` in the sequence-parallel group (rank 0 gets its own back), no gradient."""
    row_BH = row_BH.detach().contiguous()
    if sp.size == 1:
        return row_BH
    rows = [torch.empty_like(row_BH) for _ in range(sp.size)]
    dist.all_gather(rows, row_BH, group=sp.group)
    return rows[sp.rank - 1] if sp.rank > 0 else row_BH


def sharded_tidar_loss(objective, sp: SequenceParallel, input_ids, doc_ids=None, position_ids=None, loss_mask=None,
                       generator=None, return_logits: bool = False):
    """`TidarObjective.forward` for one rank of a sequence-parallel group: returns this rank's loss share (a
    TidarOutput whose terms and token counts are shares too, so summing them over the group gives the row's values)."""
    model = objective.model  # the adapter: layout, mask, the wrapped transformers model

    if return_logits:
        raise ValueError("return_logits is not available under sequence parallelism (each rank holds a shard of the "
                         "row); run the forward without deepspeed.sequence_parallel_size")
    model.check_input(input_ids)
    B, S = input_ids.shape
    doc_ids = torch.zeros_like(input_ids) if doc_ids is None else doc_ids.long()
    loss_mask = torch.ones_like(input_ids, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
    draft_mask = sample_draft_mask((B, S), objective.mask_ratio, generator, device=input_ids.device)
    layout = build_tidar_layout(input_ids, model.mask_token_id, model.block_size, doc_ids, position_ids, draft_mask)
    lookback = halo_length(model.lm) if model.has_adapter else 0
    plan = plan_shard(S, sp.rank, sp.size, halo=lookback)
    local = plan.local_idx.to(input_ids.device)
    positions_BT = layout.position_ids_BL[:, local]
    kwargs = {POSITIONS_KWARG: positions_BT}
    if model.has_adapter:
        send = torch.cat([torch.arange(S // sp.size - lookback, S // sp.size),
                          torch.arange(2 * S // sp.size - lookback, 2 * S // sp.size)]).to(input_ids.device)
        kwargs[PREV_KWARG] = extended_prev(layout, plan)
        kwargs[HALO_KWARG] = Halo(sp.group, sp.rank, sp.size, send)
    if objective.balancing_loss_fn is not None:
        kwargs["output_router_logits"] = True
    # the core attention runs in layout order (trainer.sequence_parallel.in_layout_order): the unsharded row's mask
    out = model.lm.base_model(input_ids=layout.input_ids_BL[:, local], position_ids=positions_BT,
                              attention_mask=model.mask_argument(layout.meta, layout.meta, impl=sp.core_impl, split=S),
                              use_cache=False, **kwargs)
    hidden_BTH = out.last_hidden_state
    aux = None
    if objective.balancing_loss_fn is not None:
        n_experts = getattr(model.config, "num_experts", None) or model.config.num_local_experts
        aux = balancing_share(out.router_logits, layout.meta.doc[:, local] >= 0, n_experts,
                              model.config.num_experts_per_tok, sp)

    n = S // sp.size
    chunk = slice(sp.rank * n, (sp.rank + 1) * n)
    ar_labels, ar_valid = ar_targets(input_ids, doc_ids, loss_mask)
    diff_labels, diff_valid = diff_targets(input_ids, doc_ids, loss_mask, draft_mask)
    n_ar, n_diff = int(ar_valid.sum()), int(diff_valid.sum())
    head = model.lm.get_output_embeddings()
    has_teacher = teacher_rows(ar_valid)[:, chunk]
    ar_valid, diff_valid = ar_valid[:, chunk], diff_valid[:, chunk]
    clean_BnH, draft_BnH = hidden_BTH.split(n, dim=1)

    def teacher_N() -> torch.Tensor:  # the teacher of draft i is the clean row i-1; the shard's first one is the
        clean = clean_BnH.detach()  # previous rank's last (a collective: every rank of the group calls it)
        return torch.cat([previous_rank_row(clean[:, -1], sp)[:, None], clean[:, :-1]], dim=1)[diff_valid]

    terms = hybrid_terms(clean_BnH[ar_valid], ar_labels[:, chunk][ar_valid], draft_BnH[diff_valid],
                         diff_labels[:, chunk][diff_valid], teacher_N, has_teacher[diff_valid], n_ar=n_ar,
                         n_diff=n_diff, anchors=(clean_BnH, draft_BnH), alpha=objective.alpha, aux_loss=aux,
                         aux_coef=objective.aux_coef, diff_target=objective.diff_target, head=head,
                         chunk_size=objective.loss_chunk_size, counts=(int(ar_valid.sum()), int(diff_valid.sum())))
    return TidarOutput(loss=terms.loss, terms=terms, layout=layout)
