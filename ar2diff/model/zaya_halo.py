"""The halo exchange ZAYA's CCA needs under sequence parallelism.

CCA's q/k convolution and delayed value read a token's last `lookback` stream ancestors (ar2diff.model.zaya). With
the sequence sharded over P ranks, every rank holds the clean positions [r*n, (r+1)*n) and the same draft positions,
so the ancestors of its first tokens sit on rank r-1: within `lookback` positions before r*n, in either stream (a
draft block's first token looks back into the clean stream). Before each convolution and value shift, every rank
therefore sends the last `lookback` positions of both of its streams to the next rank, and prepends what it receives
from the previous one (rank 0 receives zeros that no token reads).

The exchange is one collective that every rank of the sequence-parallel group joins (an all_gather of the tiny halo:
P x 2 x lookback tokens), in the forward and, as an autograd Function, in the backward: the gradient a rank computes
for its received halo goes back to the rank that sent it. Activation-checkpointing recomputes repeat the forward
collective on every rank in the same order, so they stay matched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

HALO_KWARG = "ar2diff_sp_halo"


def _gather(x: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


class _ShiftToNextRank(torch.autograd.Function):
    """y on rank r = x of rank r-1 (zeros on rank 0); backward: dx on rank r = dy of rank r+1 (zeros on the last)."""

    @staticmethod
    def forward(ctx, x, group, rank: int, size: int):
        ctx.group, ctx.rank, ctx.size = group, rank, size
        parts = _gather(x, group, size)
        return parts[rank - 1].clone() if rank > 0 else torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad):
        parts = _gather(grad, ctx.group, ctx.size)
        return (parts[ctx.rank + 1].clone() if ctx.rank + 1 < ctx.size else torch.zeros_like(grad)), None, None, None


@dataclass
class Halo:
    """How one rank extends its local tokens with the previous rank's halo.

    send_idx: local indices of the tokens this rank sends (the last `lookback` of each stream, clean then draft).
    The extended sequence is `[received halo (len(send_idx)) | local tokens]`; `ar2diff.model.sequence_shard` builds
    the stream-predecessor index in those extended coordinates.
    """

    group: object
    rank: int
    size: int
    send_idx: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.send_idx.numel())

    def extend(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """(B, T, D) local tokens -> (B, halo + T, D) with the previous rank's halo in front."""
        received = _ShiftToNextRank.apply(x_BTD[:, self.send_idx], self.group, self.rank, self.size)
        return torch.cat([received, x_BTD], dim=1)


def halo_length(lm) -> int:
    """How many positions of each stream a shard reads from the previous rank (the halo): the CCA convolution
    window, and at least 1, since the delayed value always reads the previous token (a window of 0, cca_time0 =
    cca_time1 = 1, still needs it); 0 for models without CCA. `ar2diff.config.sequence_parallel.stream_lookback`
    gives the same number from a config, before any model is built."""
    from transformers.models.zaya.modeling_zaya import ZayaCCAProjection

    sizes = {m.conv_kernel_size for m in lm.modules() if isinstance(m, ZayaCCAProjection)}
    return max(1, *sizes) if sizes else 0
