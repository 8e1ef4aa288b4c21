"""How dense the attention of a batch really is, for MFU that counts the attention a kernel computes.

The TiDAR mask allows about a quarter of the (2S)^2 (query, key) pairs. Counting the full square inflates MFU. Two
densities per batch, both from the records' key intervals (`ar2diff.model.flex_mask`, no QxK tensor):

- element density: allowed pairs / (Q * K), what the predicate permits;
- compute density: pairs inside the tiles a flex kernel visits (partial and full tiles of the BlockMask) / (Q * K).
  A dense kernel (SDPA or eager with a dense mask) computes every pair: its compute density is 1.

MFU then uses `flops_per_token(config, T * compute_density, N)`: the attention term of `6N + 12 L H d T` is linear
in the keys each query visits, so the effective T is the full one scaled by the compute density.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ar2diff.model.flex_mask import key_intervals, tile_counts
from ar2diff.model.layout import TokenMeta, build_tidar_layout, causal_meta

FLEX_TILE = 128  # the BlockMask tile `ar2diff.model.attention.block_mask` builds by default


@dataclass(frozen=True)
class MaskDensity:
    """Pair counts of one or more masks: allowed by the predicate, computed by the kernel, and all Q*K."""

    allowed: int
    computed: int
    total: int

    def __add__(self, other: MaskDensity) -> MaskDensity:
        return MaskDensity(self.allowed + other.allowed, self.computed + other.computed, self.total + other.total)

    @property
    def element(self) -> float:
        return self.allowed / self.total if self.total else 0.0

    @property
    def compute(self) -> float:
        return self.computed / self.total if self.total else 0.0


def _tile_areas(Q: int, K: int, tile: int, device) -> torch.Tensor:
    rows = (Q - torch.arange(0, Q, tile, device=device)).clamp(max=tile)
    cols = (K - torch.arange(0, K, tile, device=device)).clamp(max=tile)
    return rows[:, None] * cols[None, :]


def mask_density(q_meta: TokenMeta, k_meta: TokenMeta | None = None, tile: int | None = FLEX_TILE) -> MaskDensity:
    """Pair counts of `can_attend` over the records; `tile=None` means a dense kernel (every pair computed)."""
    k_meta = q_meta if k_meta is None else k_meta
    (B, Q), K = q_meta.doc.shape, k_meta.doc.shape[1]
    allowed = computed = 0
    for b in range(B):
        q, k = (TokenMeta(*(getattr(m, f)[b] for f in TokenMeta.fields())) for m in (q_meta, k_meta))
        lo_Q2, hi_Q2 = key_intervals(q, k)
        allowed += int((hi_Q2 - lo_Q2).clamp(min=0).sum())
        if tile is None:
            computed += Q * K
        else:
            visited = tile_counts(lo_Q2, hi_Q2, K, tile) > 0
            computed += int(_tile_areas(Q, K, tile, visited.device)[visited].sum())
    return MaskDensity(allowed, computed, B * Q * K)


def batch_meta(objective_kind: str, block_size: int, doc_ids_BS: torch.Tensor,
               position_ids_BS: torch.Tensor) -> TokenMeta:
    """The records the model's mask is built from for a training batch (TiDAR layout, or causal for AR)."""
    if objective_kind == "ar":
        return causal_meta(doc_ids_BS, position_ids_BS)
    return build_tidar_layout(torch.zeros_like(doc_ids_BS), 0, block_size, doc_ids_BS=doc_ids_BS,
                              position_ids_BS=position_ids_BS).meta


class DensityWindow:
    """Mask densities summed over the micro batches of one logging window."""

    def __init__(self, objective_kind: str, block_size: int, attn_implementation: str):
        self.objective_kind, self.block_size = objective_kind, block_size
        self.tile = FLEX_TILE if attn_implementation == "flex_attention" else None
        self.sum = MaskDensity(0, 0, 0)

    def add(self, doc_ids_BS: torch.Tensor, position_ids_BS: torch.Tensor) -> None:
        meta = batch_meta(self.objective_kind, self.block_size, doc_ids_BS, position_ids_BS)
        self.sum = self.sum + mask_density(meta, tile=self.tile)

    def take(self) -> dict[str, float]:
        """{mask_density, attn_compute_density} of the window so far, and start a new window."""
        out = {"mask_density": self.sum.element, "attn_compute_density": self.sum.compute}
        self.sum = MaskDensity(0, 0, 0)
        return out
