"""Held-out AR loss by position: the proof that context extension worked.

The loss of every next-token prediction is bucketed by the position id of the predicted token (its distance from
its document's start within the packed row) into powers of two, [0, 1), [1, 2), [2, 4), ..., up to seq_len.
Scoring the same rows with the phase's start and end checkpoints shows where extension helped: positions beyond
the previous phase's sequence length are ones the start checkpoint never trained on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ar2diff.decode.ar import inference, model_device
from ar2diff.objective import ar_targets


def bucket_edges(seq_len: int) -> list[int]:
    """[0, 1, 2, 4, ..., seq_len]: powers of two below seq_len, then seq_len itself."""
    edges, p = [0, 1], 2
    while p < seq_len:
        edges.append(p)
        p *= 2
    return edges + [seq_len] if seq_len > 1 else edges


@torch.no_grad()
def token_nll(model, rows: dict[str, torch.Tensor], micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll_N, position_N) of every valid next-token prediction of `model.causal_logits` (a `TidarLM`) over rows:
    the document-masked causal forward the held-out AR loss uses, one micro batch at a time, on CPU float32."""
    device = model_device(model)
    nll, pos = [], []
    with inference(model):
        for start in range(0, rows["input_ids"].shape[0], micro_batch):
            b = {k: v[start:start + micro_batch].to(device) for k, v in rows.items()}
            logits_BSV = model.causal_logits(b["input_ids"], b["doc_ids"], b["position_ids"])
            labels_BS, valid_BS = ar_targets(b["input_ids"], b["doc_ids"].long(), b["loss_mask"].bool())
            ce = F.cross_entropy(logits_BSV[valid_BS].float(), labels_BS[valid_BS], reduction="none")
            nll.append(ce.cpu())
            target_pos_BS = torch.zeros_like(b["position_ids"])
            target_pos_BS[:, :-1] = b["position_ids"][:, 1:]
            pos.append(target_pos_BS[valid_BS].cpu())
    return torch.cat(nll), torch.cat(pos)


def bucket_losses(nll_N: torch.Tensor, position_N: torch.Tensor, seq_len: int) -> list[dict]:
    """[{start, end, tokens, loss}] per bucket of `bucket_edges(seq_len)`; loss is None for an empty bucket."""
    edges = bucket_edges(seq_len)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (position_N >= lo) & (position_N < hi)
        n = int(sel.sum())
        out.append({"start": lo, "end": hi, "tokens": n, "loss": float(nll_N[sel].mean()) if n else None})
    return out


def compare_buckets(start: list[dict], end: list[dict], previous_seq_len: int | None) -> dict:
    """Per bucket end - start loss, and whether every non-empty bucket at or beyond previous_seq_len improved."""
    rows = []
    for s, e in zip(start, end):
        delta = None if s["loss"] is None or e["loss"] is None else e["loss"] - s["loss"]
        rows.append({"start": s["start"], "end": s["end"], "tokens": s["tokens"], "loss_start": s["loss"],
                     "loss_end": e["loss"], "delta": delta,
                     "beyond_previous": previous_seq_len is not None and s["start"] >= previous_seq_len})
    beyond = [r for r in rows if r["beyond_previous"] and r["delta"] is not None]
    within = [r for r in rows if not r["beyond_previous"] and r["delta"] is not None]
    return {"previous_seq_len": previous_seq_len, "buckets": rows,
            "beyond_previous_improved": bool(beyond) and all(r["delta"] < 0 for r in beyond),
            # training improves every position; extension shows as a larger gain beyond the old length
            "mean_delta_beyond": _mean_delta(beyond), "mean_delta_within": _mean_delta(within)}


def _mean_delta(rows: list[dict]) -> float | None:
    """Token-weighted mean of the bucket deltas (None without tokens)."""
    tokens = sum(r["tokens"] for r in rows)
    return sum(r["delta"] * r["tokens"] for r in rows) / tokens if tokens else None


def position_report(start_model, end_model, rows: dict[str, torch.Tensor], micro_batch: int, seq_len: int,
                    previous_seq_len: int | None) -> dict:
    """Bucketed held-out AR loss of the start and end checkpoints on the same rows, compared."""
    buckets = {}
    for name, model in (("start", start_model), ("end", end_model)):
        buckets[name] = bucket_losses(*token_nll(model, rows, micro_batch), seq_len)
    return {"seq_len": seq_len, **compare_buckets(buckets["start"], buckets["end"], previous_seq_len)}
