"""Teacher-forced drafter-verifier agreement per block offset, on held-out rows, with no decoding.

Lossless acceptance of a draft d ~ q is min(1, p(d)/q(d)) (p: the AR verifier, q: the drafter), so its expected
value is E_{d~q}[min(1, p/q)] = sum_v min(p_v, q_v) = 1 - TV(p, q); greedy decoding accepts a draft exactly when
argmax q = argmax p. Both need only one training-layout forward: the mask at position i (the draft copy) gives q_i,
and the clean stream at position i-1 gives the verifier's p(. | x_<i) for the same token. Reported per block offset
o = position mod block_size (blocks are aligned to document starts): o = 0 is the block's first mask, whose guess the
decoder never uses (the verifier supplies that token); o = 1 is the first draft a decode step verifies, a 2-ahead
guess given the block's context.

The means over the drafted offsets carry a percentile bootstrap interval over held-out rows (the unit of variation,
as prompts are for decoding): a teacher-forced figure needs no decoding and does not depend on whether the model
falls into loops, so it separates two drafters where greedy tokens per forward cannot.
"""

from __future__ import annotations

import torch

from ar2diff.decode.ar import inference, model_device
from ar2diff.decode.metrics import CONFIDENCE, ratio_interval
from ar2diff.objective import TidarObjective, ar_targets, teacher_rows


def offset_statistics(ar_logits_BSV: torch.Tensor, diff_logits_BSV: torch.Tensor, input_ids_BS: torch.Tensor,
                      doc_ids_BS: torch.Tensor, position_ids_BS: torch.Tensor, counted_BS: torch.Tensor,
                      block_size: int) -> dict[str, torch.Tensor]:
    """Per block offset sums over counted positions i that have an AR prediction at i-1 (same document):
    {count_O, argmax_agree_O, expected_accept_O (sum of sum_v min(p, q)), data_hit_O (diffusion argmax = x_i)};
    and under "rows" the same four sums per row over the drafted offsets 1..O-1 ({count_B, ...})."""
    _, ar_valid = ar_targets(input_ids_BS, doc_ids_BS, torch.ones_like(counted_BS))
    use_BS = teacher_rows(ar_valid) & counted_BS
    p_NV = torch.softmax(torch.cat([ar_logits_BSV[:, :1], ar_logits_BSV[:, :-1]], dim=1)[use_BS].float(), -1)
    q_NV = torch.softmax(diff_logits_BSV[use_BS].float(), -1)
    offset_N = (position_ids_BS[use_BS] % block_size).long()

    row_N = use_BS.nonzero()[:, 0].cpu()
    drafted_N = (offset_N > 0).double().cpu()

    def per_offset(values_N: torch.Tensor) -> torch.Tensor:
        return torch.zeros(block_size, dtype=torch.float64).index_add_(0, offset_N.cpu(), values_N.double().cpu())

    def per_row(values_N: torch.Tensor) -> torch.Tensor:
        weighted_N = values_N.double().cpu() * drafted_N
        return torch.zeros(use_BS.shape[0], dtype=torch.float64).index_add_(0, row_N, weighted_N)

    values = {"count": torch.ones_like(offset_N), "argmax_agree": (p_NV.argmax(-1) == q_NV.argmax(-1)).float(),
              "expected_accept": torch.minimum(p_NV, q_NV).sum(-1),
              "data_hit": (q_NV.argmax(-1) == input_ids_BS[use_BS]).float()}
    return {**{k: per_offset(v) for k, v in values.items()}, "rows": {k: per_row(v) for k, v in values.items()}}


def agreement_curve(objective: TidarObjective, rows: dict[str, torch.Tensor], micro_batch: int, seed: int = 0) -> dict:
    """The teacher-forced curve over `rows` (N, S) in micro batches: per block offset, P(diffusion argmax = AR
    argmax), E[min(1, p/q)] at temperature 1, P(diffusion argmax = data token), and the position counts; plus
    their means over offsets 1..B-1 (the offsets a decode step verifies) with bootstrap intervals over rows
    (`mean_over_drafts_interval`: [low, high]). JSON-ready. `objective` runs the training
    forward with both streams' logits; its `model` holds the mask token and block size."""
    model = objective.model
    B = model.block_size
    device = model_device(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    sums, rows_sums = None, []
    with inference(model):
        for start in range(0, rows["input_ids"].shape[0], micro_batch):
            batch = {k: v[start:start + micro_batch].to(device) for k, v in rows.items()}
            ids, docs = batch["input_ids"], batch["doc_ids"].long()
            out = objective(ids, docs, batch["position_ids"], batch["loss_mask"], generator=gen, return_logits=True)
            S = ids.shape[1]
            drafted = out.layout.input_ids_BL[:, S:] == model.mask_token_id
            counted = drafted & batch["loss_mask"].bool() & (docs >= 0)
            stats = offset_statistics(out.ar_logits, out.diff_logits, ids, docs, out.layout.position_ids_BL[:, :S],
                                      counted, B)
            rows_sums.append(stats.pop("rows"))
            sums = stats if sums is None else {k: sums[k] + stats[k] for k in sums}
    if sums is None:
        raise ValueError("agreement_curve needs at least one held-out row")
    keys = ("argmax_agree", "expected_accept", "data_hit")
    count = sums["count"]
    curve = {k: (sums[k] / count.clamp(min=1)).tolist() for k in keys}
    drafts = count[1:].sum().clamp(min=1)
    per_row = {k: torch.cat([r[k] for r in rows_sums]).numpy() for k in ("count", *keys)}
    used = per_row["count"] > 0  # rows with at least one drafted position
    interval = {k: list(ratio_interval(per_row[k][used], per_row["count"][used], seed=seed)) if used.any()
                else [float("nan")] * 2 for k in keys}
    return {"block_size": B, "positions": count.long().tolist(), **curve,
            "mean_over_drafts": {k: float(sums[k][1:].sum() / drafts) for k in keys},
            "mean_over_drafts_interval": interval, "rows": int(used.sum()), "confidence": CONFIDENCE}
