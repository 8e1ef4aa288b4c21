"""The flex BlockMask of the TiDAR predicate, built from the layout's run structure instead of a QxK tensor.

torch's eager `create_block_mask` evaluates `can_attend` on every (query, key) pair first: ~10 bytes per pair, so
690 GB for one 128k TiDAR row (2S = 256k). The records make that unnecessary. In every layout ar2diff builds
(training rows, decode steps) the keys come in *runs*:

- a clean run: consecutive clean keys of one document whose positions count up by one;
- a draft run: consecutive draft keys of one block (and one document).

When each document has at most one clean run and each block at most one draft run, `can_attend` gives every query
at most two key intervals: the clean keys of its document with position < ctx (a prefix of that run) and, for a
draft query, its own block's run. Summing interval overlaps per (query tile, key tile) gives the exact number of
allowed pairs in each tile, in O(Q + tiles) memory; a tile is full when every pair of it is allowed, partial when
some are, exactly the rule of torch's `_convert_mask_to_block_mask` (padding beyond Q or K counts as not allowed).
Partial tiles keep `mask_mod` = `can_attend`, so the kernel computes the same attention as the dense mask.

Layouts without run form (none that ar2diff builds) fall back to torch's builder when the dense mask is small.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from ar2diff.model.layout import TokenMeta

# Layouts that are not in run form are built by torch's dense path only below this many (query, key) pairs.
DENSE_FALLBACK_PAIRS = 1 << 26


class NotRunFormError(ValueError):
    """The records have a document split into several clean runs or a block into several draft runs."""


def _row(meta: TokenMeta, b: int) -> TokenMeta:
    return TokenMeta(*(getattr(meta, f)[b] for f in TokenMeta.fields()))


def _runs(starts_K: torch.Tensor, member_K: torch.Tensor, key_K: torch.Tensor, what: str):
    """(sorted run keys, run first index, run length) of the runs flagged by `starts_K` among `member_K` keys.

    Raises NotRunFormError when two runs share a key (a document's clean keys, or a block's drafts, are split).
    """
    first_r = torch.nonzero(starts_K).flatten()
    run_id_K = torch.cumsum(starts_K.long(), 0) - 1
    length_r = torch.bincount(run_id_K[member_K], minlength=first_r.numel())
    keys_r = key_K[first_r]
    keys_r, order_r = torch.sort(keys_r)
    if keys_r.numel() > 1 and bool((keys_r[1:] == keys_r[:-1]).any()):
        raise NotRunFormError(f"a {what} appears in more than one contiguous run of keys")
    return keys_r, first_r[order_r], length_r[order_r]


def _lookup(keys_r: torch.Tensor, query_key_Q: torch.Tensor):
    """Index of each query's run (clamped) and whether the run exists."""
    if keys_r.numel() == 0:
        zeros_Q = torch.zeros_like(query_key_Q)
        return zeros_Q, torch.zeros_like(query_key_Q, dtype=torch.bool)
    idx_Q = torch.searchsorted(keys_r, query_key_Q).clamp(max=keys_r.numel() - 1)
    return idx_Q, keys_r[idx_Q] == query_key_Q


def key_intervals(q: TokenMeta, k: TokenMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query of one row, its allowed keys as two half-open index intervals: (lo_Q2, hi_Q2).

    Column 0: the clean keys of the query's document with position < ctx; column 1: the draft keys of its block
    (empty for clean queries). Every allowed key lies in exactly one interval (clean and draft keys are disjoint).
    """
    clean_K, draft_K = ~k.is_draft, k.is_draft
    cont_K = torch.zeros_like(clean_K)
    cont_K[1:] = k.doc[1:] == k.doc[:-1]
    clean_start_K = clean_K & ~(cont_K & torch.roll(clean_K, 1) & (torch.roll(k.pos, 1) + 1 == k.pos))
    draft_start_K = draft_K & ~(cont_K & torch.roll(draft_K, 1) & (torch.roll(k.block, 1) == k.block))

    doc_r, first_r, length_r = _runs(clean_start_K, clean_K, k.doc, "document's clean stream")
    run_Q, has_Q = _lookup(doc_r, q.doc)
    first_Q = first_r[run_Q] if first_r.numel() else run_Q
    seen_Q = (q.ctx - k.pos[first_Q]).clamp(min=0)
    seen_Q = torch.minimum(seen_Q, length_r[run_Q] if length_r.numel() else seen_Q) * has_Q
    clean_lo_Q, clean_hi_Q = first_Q, first_Q + seen_Q

    block_r, bfirst_r, blength_r = _runs(draft_start_K, draft_K, k.block, "draft block")
    brun_Q, bhas_Q = _lookup(block_r, q.block)
    bfirst_Q = bfirst_r[brun_Q] if bfirst_r.numel() else brun_Q
    own_Q = bhas_Q & q.is_draft & (k.doc[bfirst_Q] == q.doc)
    draft_lo_Q = bfirst_Q
    draft_hi_Q = bfirst_Q + (blength_r[brun_Q] if blength_r.numel() else brun_Q) * own_Q
    return torch.stack([clean_lo_Q, draft_lo_Q], 1), torch.stack([clean_hi_Q, draft_hi_Q], 1)


def tile_counts(lo_Q2: torch.Tensor, hi_Q2: torch.Tensor, K: int, tile: int) -> torch.Tensor:
    """Allowed pairs per (query tile, key tile): (nQ, nK) int32, from the per-query key intervals."""
    Q = lo_Q2.shape[0]
    nQ, nK = -(-Q // tile), -(-K // tile)
    device = lo_Q2.device
    counts = torch.zeros(nQ * nK, dtype=torch.int32, device=device)
    steps = torch.zeros(nQ * (nK + 1), dtype=torch.int32, device=device)  # +tile from a key tile on, per query tile
    qt_Q = torch.arange(Q, device=device) // tile
    for j in range(lo_Q2.shape[1]):
        lo, hi = lo_Q2[:, j].int(), hi_Q2[:, j].int()
        live = hi > lo
        lo, hi, qt = lo[live], hi[live], qt_Q[live]
        a, z = lo // tile, (hi - 1) // tile
        one = a == z
        counts.index_add_(0, qt[one] * nK + a[one], hi[one] - lo[one])
        lo, hi, qt, a, z = lo[~one], hi[~one], qt[~one], a[~one], z[~one]
        counts.index_add_(0, qt * nK + a, (a + 1) * tile - lo)
        counts.index_add_(0, qt * nK + z, hi - z * tile)
        steps.index_add_(0, qt * (nK + 1) + a + 1, torch.full_like(a, tile))
        steps.index_add_(0, qt * (nK + 1) + z, torch.full_like(z, -tile))
    inner = steps.view(nQ, nK + 1).cumsum(1, dtype=torch.int32)[:, :nK]
    return counts.view(nQ, nK) + inner


def _ordered(tiles_BnQnK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(num, indices) of the flagged key tiles per query tile, in the order torch's own builder lists them.

    torch takes a stable descending argsort of the 0/1 tile flags: flagged tiles ascending, then the others
    ascending. That order is a rank per tile (a running count), so it is written with one scatter, not a sort.
    """
    flags = tiles_BnQnK.to(torch.int32)
    flagged = flags.cumsum(-1, dtype=torch.int32)
    num = flagged[..., -1:]
    positions = torch.arange(flags.shape[-1], dtype=torch.int32, device=flags.device)
    unflagged = positions + 1 - flagged
    rank = torch.where(tiles_BnQnK, flagged - 1, num + unflagged - 1).long()
    indices = torch.empty_like(flags).scatter_(-1, rank, positions.expand_as(flags).contiguous())
    return num[..., 0].contiguous(), indices


def tidar_block_mask(q_meta: TokenMeta, k_meta: TokenMeta, mask_mod, block_size: int = 128) -> BlockMask:
    """The BlockMask of `can_attend` over (q_meta, k_meta) with `mask_mod` for the partial tiles.

    Equal to `create_block_mask(mask_mod, B, None, Q, K, BLOCK_SIZE=block_size)` field by field; raises
    NotRunFormError for records that are not in run form (module docstring).
    """
    B, Q = q_meta.doc.shape
    K = k_meta.doc.shape[1]
    partial, full = [], []
    for b in range(B):
        lo_Q2, hi_Q2 = key_intervals(_row(q_meta, b), _row(k_meta, b))
        counts = tile_counts(lo_Q2, hi_Q2, K, block_size)
        full.append(counts == block_size * block_size)
        partial.append((counts > 0) & (counts < block_size * block_size))
    partial_BHnQnK, full_BHnQnK = torch.stack(partial)[:, None], torch.stack(full)[:, None]
    kv, full_kv = _ordered(partial_BHnQnK), _ordered(full_BHnQnK)
    q, full_q = (_ordered(t.transpose(-2, -1).contiguous()) for t in (partial_BHnQnK, full_BHnQnK))
    return BlockMask((Q, K), *kv, *full_kv, *q, *full_q, BLOCK_SIZE=(block_size, block_size), mask_mod=mask_mod)


def build_block_mask(q_meta: TokenMeta, k_meta: TokenMeta, mask_mod, block_size: int = 128) -> BlockMask:
    """`tidar_block_mask`, or torch's dense builder for small layouts that are not in run form."""
    try:
        return tidar_block_mask(q_meta, k_meta, mask_mod, block_size)
    except NotRunFormError as err:
        B, Q = q_meta.doc.shape
        K = k_meta.doc.shape[1]
        if B * Q * K > DENSE_FALLBACK_PAIRS:
            raise NotRunFormError(f"{err}; the flex mask of such records is built densely, which {B}x{Q}x{K} "
                                  "(query, key) pairs are too many for") from err
        return create_block_mask(mask_mod, B, None, Q, K, device=q_meta.doc.device, BLOCK_SIZE=block_size)
