"""SDPA for the TiDAR training layout without the blocks its mask leaves empty.

In the `[clean | draft]` training layout (`ar2diff.model.layout`) a clean query sees only clean keys, and a draft
query sees the clean keys before its block plus the drafts of its own block (`can_attend`). One dense SDPA call over
(2S)^2 computes all 4S^2 scores, though the visible ones are about S^2/2 + S^2/2 + S * block. A dense kernel cannot
skip masked entries inside a call, so the training forward marks its mask with the split S (`mark_split`), and the
registered "sdpa" function then runs:

- the clean queries over the clean keys: one S x S call, the same work as the AR forward's attention;
- the draft queries in `groups` contiguous runs of rows, each over only the key columns some query of the run can
  see: the clean prefix up to the run's end and the drafts within a block of the run.

Those key columns are read off the mask itself once per forward (`SplitPlan`), so a column is dropped only where
every query of the run has it masked: each query's softmax is over the same visible keys as in the one dense call.
With 4 runs the draft queries cost about 0.9 S^2 scores instead of 2 S^2. Any unmarked mask (the AR forward,
decoding, sequence parallelism, any other model in the process) goes to transformers' own `sdpa_attention_forward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ar2diff.model.attention import check_dense_mask_fits, dense_mask
from ar2diff.model.layout import TokenMeta

PLAN_ATTRIBUTE = "_ar2diff_tidar_split"
DRAFT_GROUPS = 4  # runs of draft queries; scripts/bench_train.py --draft-groups measures others


@dataclass
class DraftRun:
    """Draft query rows [start, stop) of the layout's draft half, attending clean keys [0, clean_stop) and draft
    keys [draft_start, draft_stop) (indices into the draft half), with the mask restricted to those columns."""

    start: int
    stop: int
    clean_stop: int
    draft_start: int
    draft_stop: int
    mask: torch.Tensor  # (B, 1, stop - start, clean_stop + draft_stop - draft_start), contiguous


@dataclass
class SplitPlan:
    S: int
    clean_mask: torch.Tensor  # (B, 1, S, S), contiguous
    runs: list[DraftRun]


def _span(visible_K: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) of the True entries of a 1-D boolean (an empty span (0, 0) when there are none)."""
    idx = visible_K.nonzero()
    return (0, 0) if idx.numel() == 0 else (int(idx[0]), int(idx[-1]) + 1)


def _rows(meta: TokenMeta, start: int, stop: int) -> TokenMeta:
    return TokenMeta(*(getattr(meta, f)[:, start:stop] for f in TokenMeta.fields()))


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def plan_split(meta: TokenMeta, S: int, dtype: torch.dtype, groups: int = DRAFT_GROUPS) -> SplitPlan:
    """The calls `split_sdpa_forward` makes for the records of a `[clean | draft]` training layout (B, 2S), with
    their additive masks (`can_attend`, as `ar2diff.model.attention.attention_mask_for` builds the whole one).

    Raises ValueError if the records are not of that layout (clean first, then draft) or if a query sees no key
    (its softmax would change when its masked columns are dropped)."""
    if meta.doc.shape[1] != 2 * S:
        raise ValueError(f"the split SDPA needs the records of a 2S = {2 * S} layout, got {meta.doc.shape[1]}")
    if bool(meta.is_draft[:, :S].any()) or not bool(meta.is_draft[:, S:].all()):
        raise ValueError("the records are not the TiDAR training layout (S clean tokens, then S drafts)")
    clean = _rows(meta, 0, S)
    check_dense_mask_fits("sdpa", _rows(meta, S, 2 * S), meta, dtype)  # all runs together are at most S x 2S
    allowed = dense_mask(clean, clean)
    if not bool(allowed.any(dim=-1).all()):
        raise ValueError("a clean query of this layout sees no key: the split SDPA would change its softmax")
    runs = []
    bounds = torch.linspace(0, S, max(1, min(groups, S)) + 1).round().long().tolist()
    for start, stop in zip(bounds[:-1], bounds[1:]):
        seen = dense_mask(_rows(meta, S + start, S + stop), meta)  # (B, 1, rows, 2S)
        if not bool(seen.any(dim=-1).all()):
            raise ValueError("a draft query of this layout sees no key: the split SDPA would change its softmax")
        seen_K = seen.flatten(0, 2).any(dim=0)
        _, clean_stop = _span(seen_K[:S])
        draft_start, draft_stop = _span(seen_K[S:])
        kept = torch.cat([seen[..., :clean_stop], seen[..., S + draft_start:S + draft_stop]], dim=-1)
        runs.append(DraftRun(start, stop, clean_stop, draft_start, draft_stop, _additive(kept, dtype)))
    return SplitPlan(S, _additive(allowed, dtype), runs)


def split_mask(meta: TokenMeta, S: int, dtype: torch.dtype, groups: int | None = None) -> torch.Tensor:
    """The SDPA `attention_mask` of a training forward: a (B, 1, 2S, 2S) zero-stride placeholder that carries the
    `SplitPlan` (`groups` runs of draft queries, default DRAFT_GROUPS). transformers passes a 4D mask through to
    the attention function unchanged; `split_sdpa_forward` reads the plan and never the placeholder's values."""
    plan = plan_split(meta, S, dtype, DRAFT_GROUPS if groups is None else groups)
    B = meta.doc.shape[0]
    placeholder = torch.zeros((1, 1, 1, 1), dtype=dtype, device=meta.doc.device).expand(B, 1, 2 * S, 2 * S)
    setattr(placeholder, PLAN_ATTRIBUTE, plan)
    return placeholder


def split_sdpa_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention-function signature; query/key/value are (B, H, L, D), the output (B, L, H, D)."""
    plan = getattr(attention_mask, PLAN_ATTRIBUTE, None)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    S = plan.S
    if query.shape[2] != 2 * S or key.shape[2] != 2 * S:  # the placeholder must never be used as a mask
        raise ValueError(f"the split SDPA plan of a 2S = {2 * S} layout reached attention over {query.shape[2]} "
                         f"queries x {key.shape[2]} keys")
    outputs = [sdpa_attention_forward(module, query[:, :, :S], key[:, :, :S], value[:, :, :S], plan.clean_mask,
                                      **kwargs)[0]]
    for run in plan.runs:
        keys = torch.cat([key[:, :, :run.clean_stop], key[:, :, S + run.draft_start:S + run.draft_stop]], dim=2)
        values = torch.cat([value[:, :, :run.clean_stop], value[:, :, S + run.draft_start:S + run.draft_stop]], dim=2)
        outputs.append(sdpa_attention_forward(module, query[:, :, S + run.start:S + run.stop], keys, values,
                                              run.mask, **kwargs)[0])
    return torch.cat(outputs, dim=1), None


AttentionInterface.register("sdpa", split_sdpa_forward)
