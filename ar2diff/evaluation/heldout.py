"""Held-out rows: token-weighted losses of the training objective, and the prompts cut from them (document segments,
round-robin over rows) that the decoder check, pass@k and the agreement curve share."""

from __future__ import annotations

import torch

from ar2diff.decode.common import inference, model_device
from ar2diff.model.sequence_shard import reduce_logged
from ar2diff.objective import TidarObjective


def heldout_losses(model: TidarObjective, rows: dict[str, torch.Tensor], micro_batch: int, seed: int = 0) -> dict:
    """Token-weighted mean AR / diffusion / router losses of `model.forward` over `rows` in micro batches (no grad).

    The draft mask (random only for mask_ratio < 1) comes from a generator seeded with `seed`, so the numbers
    repeat. `loss` is the hybrid objective (alpha from the model) without the router term. Under sequence
    parallelism (every rank of the group calls this with the same rows) each rank's terms are shares of the row's:
    they are summed over the group per batch, so every rank returns the one-rank numbers.
    """
    n_rows = rows["input_ids"].shape[0]
    if n_rows == 0:
        raise ValueError("no held-out rows to evaluate: raise data.heldout_fraction (or add held-out data)")
    device = model_device(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    sums = {"ar": 0.0, "diff": 0.0, "aux": 0.0, "n_ar": 0, "n_diff": 0, "batches": 0}
    with inference(model):
        for start in range(0, n_rows, micro_batch):
            batch = {k: v[start:start + micro_batch].to(device) for k, v in rows.items()}
            terms = model(batch["input_ids"], batch["doc_ids"], batch["position_ids"], batch["loss_mask"],
                          generator=gen).terms
            row = reduce_logged({"ar": float(terms.ar), "diff": float(terms.diff), "aux": float(terms.aux),
                                 "n_ar": terms.n_ar, "n_diff": terms.n_diff},
                                getattr(model, "sequence_parallel", None), device)
            sums["ar"] += row["ar"] * row["n_ar"]
            sums["diff"] += row["diff"] * row["n_diff"]
            sums["aux"] += row["aux"]
            sums["n_ar"] += int(row["n_ar"])
            sums["n_diff"] += int(row["n_diff"])
            sums["batches"] += 1
    ar = sums["ar"] / sums["n_ar"] if sums["n_ar"] else 0.0
    diff = sums["diff"] / sums["n_diff"] if sums["n_diff"] else 0.0
    return {"rows": n_rows, "batches": sums["batches"], "tokens": int(rows["input_ids"].numel()),
            "tokens_ar": sums["n_ar"], "tokens_diff": sums["n_diff"], "loss_ar": ar, "loss_diff": diff,
            "loss": (model.alpha * ar + diff) / (1 + model.alpha), "loss_aux": sums["aux"] / sums["batches"]}


def prompt_segments(doc_ids_NS: torch.Tensor, prompt_len: int) -> list[list[int]]:
    """Per row, the start of every document segment (a run of one doc id >= 0) of at least prompt_len tokens."""
    out = []
    for row in doc_ids_NS.tolist():
        starts, i = [], 0
        while i < len(row):
            j = i
            while j < len(row) and row[j] == row[i]:
                j += 1
            if row[i] >= 0 and j - i >= prompt_len:
                starts.append(i)
            i = j
        out.append(starts)
    return out


def select_prompts(rows: dict[str, torch.Tensor], num_prompts: int, prompt_len: int) -> list[tuple[int, int]]:
    """(row, start) of `num_prompts` prompts: the first prompt_len tokens of document segments, taken round-robin
    over rows (each row's first segment, then each row's second, ...) so prompts come from as many rows as possible.
    Deterministic; segments shorter than prompt_len are skipped."""
    per_row = prompt_segments(rows["doc_ids"], prompt_len)
    picks = [(r, starts[k]) for k in range(max(map(len, per_row), default=0))
             for r, starts in enumerate(per_row) if k < len(starts)]
    if len(picks) < num_prompts:
        raise ValueError(f"the held-out split has {len(picks)} document segments of >= decoder.prompt_len="
                         f"{prompt_len} tokens in {len(per_row)} rows, fewer than decoder.num_prompts={num_prompts}; "
                         "lower decoder.prompt_len or decoder.num_prompts, or raise data.heldout_fraction")
    return picks[:num_prompts]


def read_heldout(heldout, loss_rows: int, num_prompts: int, prompt_len: int) -> dict[str, torch.Tensor]:
    """Leading rows of a `PackedDataset`: at least `loss_rows` (when there are that many) and enough to cut
    `num_prompts` prompts from (doubling the read until they are found or the split is exhausted)."""
    total = len(heldout)
    if total == 0:
        raise ValueError("the held-out split is empty: raise data.heldout_fraction (or add held-out data)")
    n = min(total, max(loss_rows, num_prompts, 1))
    while True:
        rows = heldout.rows(range(n))
        found = sum(map(len, prompt_segments(rows["doc_ids"], prompt_len)))
        if found >= num_prompts or n == total:
            return rows
        n = min(total, 2 * n)
