"""The token records of one TiDAR decode step: which tokens go into the forward, where, and who sees whom.

A step with committed sequence x_0..x_{n-1} (t_last = x_{n-1}, the newest committed token) and k drafts
d_1..d_k from the previous step lays out, as one row:

    [x_0 .. x_{n-2} | t_last, d_1 .. d_k | M..M (level l_1) | M..M (level l_2) | ...]
     prefix (cached)  clean stream          one template of block_size masks per drafted level

- clean tokens (prefix, t_last, drafts) sit at positions 0..n-1+k and attend causally (ctx = pos + 1), so the AR
  logits at t_last, d_1..d_k are p(d_1 | x), ..., p(d_k | x, d_<k) and the bonus p(. | x, d_1..d_k);
- the template of level l (l drafts accepted) is a draft-stream block at positions n+l .. n+l+B-1 with
  ctx = n+l: it sees exactly the clean tokens x, d_1..d_l (never d_{l+1}.., whatever the verifier decides) and
  its own masks, as in training (`ar2diff.model.layout.build_tidar_layout`: a block's first mask sits at the
  block's first position and predicts the token there). Its first mask is therefore the drafter's guess for the
  token sampled at position n+l after l acceptances; the masks after it draft the following positions.

The prefix is in the KV cache when there is one: the forward then takes the layout from index `cached` on, with
`meta` sliced for the queries and the full `meta` for the keys. Without a cache (ZAYA) the whole layout goes in,
with the stream index `prev` (each token's predecessor in its own stream: the clean token before a template for
its first mask) that the ZAYA CCA adapter needs. Both are the same records, so both forwards compute the same
logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ar2diff.model.layout import TokenMeta

ALL_LEVELS = "all"


@dataclass
class StepLayout:
    """One decode step's full layout (prefix included), L tokens, batch 1.

    first: layout index of t_last; rows first..first+k are the clean stream being verified.
    templates: {level: layout index of that template's first mask}; each template is `block_size` long.
    """

    input_ids_1L: torch.Tensor
    position_ids_1L: torch.Tensor
    meta: TokenMeta
    prev_1L: torch.Tensor
    first: int
    num_drafts: int
    block_size: int
    templates: dict[int, int]

    @property
    def length(self) -> int:
        return self.input_ids_1L.shape[1]

    def ar_rows(self) -> slice:
        """Rows (layout indices) of t_last, d_1..d_k: their logits verify the drafts and give the bonus."""
        return slice(self.first, self.first + self.num_drafts + 1)

    def template_rows(self, level: int) -> slice:
        start = self.templates[level]
        return slice(start, start + self.block_size)


def slice_meta(meta: TokenMeta, start: int) -> TokenMeta:
    """The records of layout tokens start.. (the queries of a forward whose keys before `start` are cached)."""
    return TokenMeta(*(getattr(meta, f)[:, start:] for f in TokenMeta.fields()))


def build_step_layout(committed: Sequence[int], drafts: Sequence[int], levels: Sequence[int], block_size: int,
                      mask_token_id: int, device=None) -> StepLayout:
    """The layout of one step (module docstring). committed: the whole committed sequence (prompt + generated)."""
    n, k = len(committed), len(drafts)
    if n == 0:
        raise ValueError("a decode step needs at least one committed token (the prompt must not be empty)")
    if any(not 0 <= level <= k for level in levels) or len(set(levels)) != len(levels):
        raise ValueError(f"template levels {list(levels)} must be distinct and lie in [0, {k}] (number of drafts)")
    clean_ids = list(committed) + list(drafts)
    num_clean = n + k
    ids = clean_ids + [mask_token_id] * (block_size * len(levels))
    clean_pos = list(range(num_clean))
    pos, ctx, block, prev = list(clean_pos), [p + 1 for p in clean_pos], [-1] * num_clean, [p - 1 for p in clean_pos]
    templates = {}
    for b, level in enumerate(levels):
        start_pos, start_idx = n + level, len(pos)
        templates[level] = start_idx
        pos += list(range(start_pos, start_pos + block_size))
        ctx += [start_pos] * block_size
        block += [b] * block_size
        # first mask follows the clean token before the block (t_last or d_level), the others the previous mask
        prev += [start_pos - 1] + list(range(start_idx, start_idx + block_size - 1))
    L = len(ids)

    def row(values, dtype=torch.long):
        return torch.tensor([values], dtype=dtype, device=device)

    meta = TokenMeta(doc=torch.zeros(1, L, dtype=torch.long, device=device), pos=row(pos),
                     is_draft=row([i >= num_clean for i in range(L)], torch.bool), block=row(block), ctx=row(ctx))
    return StepLayout(input_ids_1L=row(ids), position_ids_1L=row(pos), meta=meta, prev_1L=row(prev), first=n - 1,
                      num_drafts=k, block_size=block_size, templates=templates)


def parse_levels(levels: str | Sequence[int] | None, block_size: int) -> str | tuple[int, ...]:
    """Validate the `levels` setting: "all" or None (TiDAR: a template per possible outcome) or acceptance levels.

    A level l drafts the next block for the outcome "l drafts accepted"; with block_size B there are at most B-1
    drafts, so levels lie in [0, B-1]. Zyphra's vLLM path drafts levels (4, 7, 10) at B = 16.
    """
    if levels is None:
        return ALL_LEVELS
    if isinstance(levels, str):
        if levels != ALL_LEVELS:
            raise ValueError(f"levels must be 'all' or a list of acceptance levels like [4, 7, 10], got {levels!r}")
        return ALL_LEVELS
    out = tuple(sorted({int(level) for level in levels}))
    if not out or any(isinstance(v, bool) or int(v) != v for v in levels) or not 0 <= out[0] <= out[-1] < block_size:
        raise ValueError(f"levels must be a non-empty list of integers in [0, block_size-1] = [0, {block_size - 1}] "
                         f"(drafts accepted), or 'all'; got {list(levels)}")
    return out


def step_levels(levels: str | tuple[int, ...], num_drafts: int) -> tuple[int, ...]:
    """Levels drafted at a step with `num_drafts` drafts: all of 0..k, or the configured ones that can happen
    (<= k). When none can (the first step, or drafts cut short), level 0: every step drafts the next block."""
    if levels == ALL_LEVELS:
        return tuple(range(num_drafts + 1))
    usable = tuple(level for level in levels if level <= num_drafts)
    return usable or (0,)


def level_for(accepted: int, drafted: Sequence[int]) -> int | None:
    """The drafted level whose template serves the outcome: the closest at or below `accepted` (None: no template
    applies, the next step verifies no drafts)."""
    below = [level for level in drafted if level <= accepted]
    return max(below) if below else None


def next_draft_rows(level: int, accepted: int, block_size: int) -> slice:
    """Rows, within the template of `level`, that draft the positions after the committed token t.

    The template starts at the position of d_{level+1}; after `accepted` drafts and t are committed the first free
    position is level's start + (accepted - level) + 1, so its first (accepted - level) + 1 masks are dropped:
    the masks at already committed positions and the one at t's position (t came from the verifier).
    """
    return slice(accepted - level + 1, block_size)
