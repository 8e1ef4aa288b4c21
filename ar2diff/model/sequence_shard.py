"""Sharding one TiDAR row over the P ranks of a sequence-parallel (Ulysses) group: who holds which positions.

Layout: a row of S tokens is `[clean | draft]` (2S positions, ar2diff.model.layout). Rank r of P holds matching
chunks of both streams: the clean positions [r*n, (r+1)*n) and the same draft positions, n = S/P, as its local
sequence `[clean_r | draft_r]` (2n tokens). Every rank has the whole row's token ids (S integers), so layout records,
targets and token counts are computed for the whole row without communication; only activations are sharded.

Attention: the Ulysses all-to-all (ar2diff.trainer.sequence_parallel) gathers the sequence in rank order,
`[clean_0 | draft_0 | clean_1 | draft_1 | ...]` (`ShardPlan.gathered_idx`), and scatters heads; the core attention
permutes q/k/v back into layout order, so the mask is the unsharded row's, built once per micro-batch and handed to
the model like any other mask: every layer uses it. (Building it over the gathered order instead split every
document that crosses a shard edge into P runs of clean keys, which the O(L) flex BlockMask builder cannot take.)

The loss share of each rank is computed by ar2diff.objective.sharded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ar2diff.model.layout import TidarLayout, TokenMeta

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


def take_meta(meta: TokenMeta, idx: torch.Tensor) -> TokenMeta:
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


def reduce_logged(values: dict[str, float], sp: SequenceParallel | None, device) -> dict[str, float]:
    """Logged loss terms and token counts of a rank are shares of its row: sum them over the group."""
    if sp is None or sp.size == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=sp.group)
    return dict(zip(keys, t.tolist()))
