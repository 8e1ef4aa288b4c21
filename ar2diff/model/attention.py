"""The one TiDAR attention predicate, compiled to a dense mask (SDPA/eager, CPU) or a flex BlockMask (accelerators).

`can_attend` is the single source of truth (docs/design.md, "Objective"): a clean query sees earlier-or-equal clean
tokens of its document (causal); a draft query sees the clean tokens of its document before its block's first
position plus every draft token of its own block; nothing crosses a document. Both compiled forms evaluate this same
function, so they cannot drift apart.
"""

from __future__ import annotations

import os

import torch

from ar2diff.model.flex_mask import build_block_mask
from ar2diff.model.layout import TokenMeta


def can_attend(q: TokenMeta, k: TokenMeta) -> torch.Tensor:
    """Whether query q may attend key k; works elementwise on any broadcastable TokenMeta tensors."""
    same_doc = q.doc == k.doc
    visible_clean = ~k.is_draft & (k.pos < q.ctx)
    same_block = q.is_draft & k.is_draft & (q.block == k.block)
    return same_doc & (visible_clean | same_block)


def _index(meta: TokenMeta, b, i) -> TokenMeta:
    return TokenMeta(*(getattr(meta, f)[b, i] for f in TokenMeta.fields()))


def mask_mod(q_meta: TokenMeta, k_meta: TokenMeta):
    """A flex-attention `mask_mod(b, h, q_idx, kv_idx)` evaluating `can_attend` on the given records.

    q_meta is (B, Q) for the queries of this forward, k_meta is (B, K) for every key (cache + this forward).
    """

    def mod(b, h, q_idx, kv_idx):
        return can_attend(_index(q_meta, b, q_idx), _index(k_meta, b, kv_idx))

    return mod


def dense_mask(q_meta: TokenMeta, k_meta: TokenMeta | None = None) -> torch.Tensor:
    """Boolean (B, 1, Q, K) mask, True = attend, from the same predicate (for SDPA; see `attention_mask_for`)."""
    k_meta = q_meta if k_meta is None else k_meta
    q = TokenMeta(*(getattr(q_meta, f)[:, :, None] for f in TokenMeta.fields()))
    k = TokenMeta(*(getattr(k_meta, f)[:, None, :] for f in TokenMeta.fields()))
    return can_attend(q, k)[:, None]


def block_mask(q_meta: TokenMeta, k_meta: TokenMeta | None = None, block_size: int = 128):
    """A flex-attention BlockMask of the same predicate (accelerators; torch 2.13 has no flex backward on CPU).

    Built from the records' run structure (`ar2diff.model.flex_mask`), never as a dense QxK tensor.
    """
    k_meta = q_meta if k_meta is None else k_meta
    return build_block_mask(q_meta, k_meta, mask_mod(q_meta, k_meta), block_size)


# Peak bytes per (query, key) pair while `dense_mask` evaluates `can_attend` (measured on CPU at 2S = 8k: the
# boolean result plus the predicate's intermediates); the additive float mask (SDPA, eager) adds its own bytes.
DENSE_BYTES_PER_PAIR = 5


class DenseMaskTooLargeError(MemoryError):
    """The dense (B, 1, Q, K) mask of SDPA/eager attention would not fit in the device's free memory."""


def dense_mask_bytes(B: int, Q: int, K: int, dtype: torch.dtype = torch.float32) -> int:
    """Peak bytes of building the dense mask SDPA and eager take for B rows of Q queries, K keys: the boolean
    predicate's and the additive float mask's."""
    return B * Q * K * (DENSE_BYTES_PER_PAIR + dtype.itemsize)


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory of `device` (accelerator memory, or the host's available RAM for CPU); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and os.path.exists("/proc/meminfo"):  # MemAvailable counts reclaimable page cache
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def check_dense_mask_fits(impl: str, q_meta: TokenMeta, k_meta: TokenMeta, dtype: torch.dtype) -> None:
    """Raise DenseMaskTooLargeError, naming the fix, before a dense mask that cannot fit is allocated."""
    (B, Q), K = q_meta.doc.shape, k_meta.doc.shape[1]
    need = dense_mask_bytes(B, Q, K, dtype)
    free = free_memory_bytes(q_meta.doc.device)
    if free is not None and need > free:
        raise DenseMaskTooLargeError(
            f"the dense {impl} attention mask for {B} row(s) of {Q} queries x {K} keys needs {need / 2**30:.1f} GiB, "
            f"more than the {free / 2**30:.1f} GiB free on {q_meta.doc.device}; set "
            "model.attn_implementation=flex_attention (its BlockMask is built without a dense mask)")


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = attend) as the additive float mask SDPA and eager take: 0 or the dtype's lowest value."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def attention_mask_for(impl: str, q_meta: TokenMeta, k_meta: TokenMeta | None = None,
                       dtype: torch.dtype = torch.float32):
    """The mask in the form the model's attention implementation takes.

    SDPA and eager get an additive float mask (0 = attend, the dtype's lowest value = not), built once per forward
    and shared by every layer. Eager adds the mask to the scores, so a boolean there would silently give wrong
    logits. SDPA would take a boolean, but converts it to an additive mask inside every call: once per layer, with
    each layer's copy held for the backward (`scripts/bench_sdpa_mask.py`: 0.72-0.78x the peak memory of a 4-layer
    model's training step at S = 4096 on CPU, in one dense call; the README has the step times). For every query
    with at least one visible key the result is bit-identical to the boolean form. Flex takes a BlockMask. A dense
    mask that would not fit in memory is refused with DenseMaskTooLargeError. The training forward's SDPA mask is
    built by `ar2diff.model.split_attention.split_mask` instead, in pieces of the same predicate.
    """
    k_meta = q_meta if k_meta is None else k_meta
    if impl in ("sdpa", "eager"):
        check_dense_mask_fits(impl, q_meta, k_meta, dtype)
        return additive_mask(dense_mask(q_meta, k_meta), dtype)
    if impl == "flex_attention":
        return block_mask(q_meta, k_meta)
    raise ValueError(
        f"attention implementation {impl!r} is not supported by the TiDAR mask; use one of "
        "'sdpa' (CPU and accelerators), 'flex_attention' (accelerators) or 'eager'")
