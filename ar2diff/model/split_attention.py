"""SDPA for the TiDAR training layout without the blocks its mask leaves empty.

In the `[clean | draft]` training layout (`ar2diff.model.layout`) a clean query sees only clean keys, and a draft
query sees the clean keys before its block plus the drafts of its own block (`can_attend`). One dense SDPA call over
(2S)^2 computes all 4S^2 scores, though the visible ones are about S^2/2 + S^2/2 + S * block. A dense kernel cannot
skip masked entries inside a call, so the training forward passes a split plan instead of a mask (`split_mask`),
and the registered "sdpa" function then runs:

- the clean queries over the clean keys: one S x S call, the same work as the AR forward's attention;
- the draft queries in contiguous runs of rows (`draft_groups`), each over only the key columns some query of the
  run can see: the clean prefix up to the run's end and the drafts within a block of the run.

Those key columns are read off the predicate once per forward (`plan_split`), which builds only the mask pieces the
calls use; a column is dropped only where every query of the run has it masked, so each query's softmax is over the
same visible keys as in one dense call.
With g runs the draft queries cost about S^2 ((g + 1) / 2g + 1/g) scores instead of 2 S^2 (0.88 S^2 at 4 runs,
0.69 S^2 at 8), so the whole attention costs about 1.7-1.9x the AR forward's S^2. Any mask without a plan (the AR
forward, decoding, sequence parallelism, any other model in the process) goes to transformers' own
`sdpa_attention_forward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ar2diff.model.attention import additive_mask, check_dense_mask_fits, dense_mask
from ar2diff.model.layout import TokenMeta

PLAN_ATTRIBUTE = "_ar2diff_tidar_split"
# Runs of draft queries: S // MIN_RUN_ROWS, at most MAX_DRAFT_GROUPS (scripts/bench_train.py --compare-groups
# measures other counts; more runs cut the scores but add a call, a mask piece and key copies each).
MAX_DRAFT_GROUPS = 8
MIN_RUN_ROWS = 64


def draft_groups(S: int) -> int:
    """The default number of runs of draft queries for a layout of split S (4 at S = 256, 8 from S = 512)."""
    return max(1, min(MAX_DRAFT_GROUPS, S // MIN_RUN_ROWS))


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


def plan_split(meta: TokenMeta, S: int, dtype: torch.dtype, groups: int | None = None) -> SplitPlan:
    """The calls `split_sdpa_forward` makes for the records of a `[clean | draft]` training layout (B, 2S), with
    their additive masks (`can_attend`, as `ar2diff.model.attention.attention_mask_for` builds the whole one).

    `groups` runs of draft queries (default `draft_groups(S)`). Raises ValueError if the records are not of that
    layout (clean first, then draft) or if a query sees no key (its softmax would change when its masked columns
    are dropped)."""
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
    groups = draft_groups(S) if groups is None else groups
    bounds = torch.linspace(0, S, max(1, min(groups, S)) + 1).round().long().tolist()
    for start, stop in zip(bounds[:-1], bounds[1:]):
        seen = dense_mask(_rows(meta, S + start, S + stop), meta)  # (B, 1, rows, 2S)
        if not bool(seen.any(dim=-1).all()):
            raise ValueError("a draft query of this layout sees no key: the split SDPA would change its softmax")
        seen_K = seen.flatten(0, 2).any(dim=0)
        _, clean_stop = _span(seen_K[:S])
        draft_start, draft_stop = _span(seen_K[S:])
        kept = torch.cat([seen[..., :clean_stop], seen[..., S + draft_start:S + draft_stop]], dim=-1)
        runs.append(DraftRun(start, stop, clean_stop, draft_start, draft_stop, additive_mask(kept, dtype)))
    return SplitPlan(S, additive_mask(allowed, dtype), runs)


def split_mask(meta: TokenMeta, S: int, dtype: torch.dtype, groups: int | None = None) -> torch.Tensor:
    """The SDPA `attention_mask` of a training forward: a (B, 1, 2S, 2S) zero-stride placeholder that carries the
    `SplitPlan` (`groups` runs of draft queries, default `draft_groups(S)`). transformers passes a 4D mask through to
    the attention function unchanged; `split_sdpa_forward` reads the plan and never the placeholder's values."""
    plan = plan_split(meta, S, dtype, groups)
    B = meta.doc.shape[0]
    placeholder = torch.zeros((1, 1, 1, 1), dtype=dtype, device=meta.doc.device).expand(B, 1, 2 * S, 2 * S)
    setattr(placeholder, PLAN_ATTRIBUTE, plan)
    return placeholder


def _gather_ranges(x: torch.Tensor, calls: list[list[tuple[int, int]]]) -> list[torch.Tensor]:
    """For each call, x[:, :, lo:hi] of its ranges concatenated in order, from one split of x at every boundary.

    Slicing x once per range would make autograd zero-fill a full-size gradient per slice and add them up; one split
    leaves each piece's gradient the size of the piece, joined by a single cat in the backward."""
    cuts = sorted({0, x.shape[2], *(b for ranges in calls for r in ranges for b in r)})
    pieces = x.split([b - a for a, b in zip(cuts[:-1], cuts[1:])], dim=2)
    index = {c: i for i, c in enumerate(cuts)}
    out = []
    for ranges in calls:
        parts = [p for lo, hi in ranges for p in pieces[index[lo]:index[hi]]]
        out.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return out


def split_sdpa_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention-function signature; query/key/value are (B, H, L, D), the output (B, L, H, D)."""
    plan = getattr(attention_mask, PLAN_ATTRIBUTE, None)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    S = plan.S
    if query.shape[2] != 2 * S or key.shape[2] != 2 * S:  # the placeholder must never be used as a mask
        raise ValueError(f"the split SDPA plan of a 2S = {2 * S} layout reached attention over {query.shape[2]} "
                         f"queries x {key.shape[2]} keys")
    queries = query.split([S] + [run.stop - run.start for run in plan.runs], dim=2)
    calls = [[(0, S)]] + [[(0, run.clean_stop), (S + run.draft_start, S + run.draft_stop)] for run in plan.runs]
    keys, values = _gather_ranges(key, calls), _gather_ranges(value, calls)
    masks = [plan.clean_mask] + [run.mask for run in plan.runs]
    outputs = [sdpa_attention_forward(module, q, k, v, m, **kwargs)[0]
               for q, k, v, m in zip(queries, keys, values, masks)]
    return torch.cat(outputs, dim=1), None


AttentionInterface.register("sdpa", split_sdpa_forward)
