"""The TiDAR training layout: `[x_1..x_S | M..M]` with per-token facts for the attention predicate.

A training row of S tokens becomes 2S positions: the clean copy (AR stream) followed by the draft copy (diffusion
stream), which reuses the clean position ids. Every token carries a `TokenMeta` record; the attention mask
(`ar2diff.model.attention`) is one predicate over those records, and the decoder builds its own records for its
step layouts, so training and decoding share one definition of who sees whom.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenMeta:
    """Per-token facts the TiDAR mask is a predicate over. Every field is (B, L).

    doc:      document id inside the row; -1 marks padding.
    pos:      position id (restarts at 0 at each document start).
    is_draft: True for the diffusion stream (mask tokens and, in the random-ratio ablation, kept tokens).
    block:    draft-block id, unique within a row; -1 for clean tokens.
    ctx:      a clean key at position p is visible iff p < ctx (clean query: pos + 1, i.e. causal;
              draft query: the position of its block's first token).
    """

    doc: torch.Tensor
    pos: torch.Tensor
    is_draft: torch.Tensor
    block: torch.Tensor
    ctx: torch.Tensor

    @staticmethod
    def cat(metas: list[TokenMeta]) -> TokenMeta:
        """Concatenate along the sequence dimension."""
        return TokenMeta(*(torch.cat([getattr(m, f) for m in metas], dim=1) for f in TokenMeta.fields()))

    @staticmethod
    def fields() -> tuple[str, ...]:
        return ("doc", "pos", "is_draft", "block", "ctx")

    def to(self, device) -> TokenMeta:
        return TokenMeta(*(getattr(self, f).to(device) for f in self.fields()))


@dataclass
class TidarLayout:
    """Model inputs for one TiDAR forward (L = 2S) plus what the loss and the adapters need."""

    input_ids_BL: torch.Tensor
    position_ids_BL: torch.Tensor
    meta: TokenMeta
    # Index (in the layout) of each token's predecessor in its own stream, -1 at a document start. Only the
    # architecture adapters that mix neighbouring positions outside attention use it (ar2diff.model.zaya).
    prev_BL: torch.Tensor
    draft_mask_BS: torch.Tensor  # True where the draft copy holds [MASK] (these get the diffusion loss)
    seq_len: int  # S


def positions_from_docs(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at every document start (padding, doc -1, counts as its own run)."""
    B, S = doc_ids_BS.shape
    idx_BS = torch.arange(S, device=doc_ids_BS.device).expand(B, S)
    starts_BS = torch.ones_like(doc_ids_BS, dtype=torch.bool)
    starts_BS[:, 1:] = doc_ids_BS[:, 1:] != doc_ids_BS[:, :-1]
    start_idx_BS = torch.where(starts_BS, idx_BS, torch.zeros_like(idx_BS)).cummax(dim=1).values
    return idx_BS - start_idx_BS


def check_contiguous_docs(doc_ids_BS: torch.Tensor) -> None:
    """Raise ValueError if a row's document ids repeat non-contiguously (e.g. 0, 1, 0).

    The mask allows attention between equal document ids, so a document id that comes back later in the row would
    let the later segment see the earlier one. The packer never writes such rows; other inputs are rejected here.
    """
    B, S = doc_ids_BS.shape
    starts_BS = torch.ones_like(doc_ids_BS, dtype=torch.bool)
    starts_BS[:, 1:] = doc_ids_BS[:, 1:] != doc_ids_BS[:, :-1]
    sentinel = torch.iinfo(torch.long).max
    run_ids_BS = torch.where(starts_BS, doc_ids_BS.long(), torch.full_like(doc_ids_BS, sentinel, dtype=torch.long))
    sorted_BS = run_ids_BS.sort(dim=1).values
    repeat_BS = (sorted_BS[:, 1:] == sorted_BS[:, :-1]) & (sorted_BS[:, 1:] != sentinel)
    if bool(repeat_BS.any()):
        row = int(repeat_BS.any(dim=1).nonzero()[0])
        doc = int(sorted_BS[row, 1:][repeat_BS[row]][0])
        raise ValueError(f"doc_ids row {row}: document id {doc} appears in two separate segments; each document "
                         "must occupy one contiguous span of a packed row (renumber the later segment)")


def sample_draft_mask(shape: tuple[int, int], mask_ratio: float, generator: torch.Generator | None = None,
                      device=None) -> torch.Tensor:
    """Which draft positions hold [MASK]: all of them for "full mask" (ratio 1.0, TiDAR's default), otherwise each
    position independently with probability `mask_ratio` (the random-mask ablation)."""
    if not 0.0 < mask_ratio <= 1.0:
        raise ValueError(f"objective.mask_ratio must be in (0, 1], got {mask_ratio}")
    if mask_ratio == 1.0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    u = torch.rand(shape, generator=generator, device=generator.device if generator is not None else device)
    return (u < mask_ratio).to(device)


def build_tidar_layout(
    input_ids_BS: torch.Tensor,
    mask_token_id: int,
    block_size: int,
    doc_ids_BS: torch.Tensor | None = None,
    position_ids_BS: torch.Tensor | None = None,
    draft_mask_BS: torch.Tensor | None = None,
) -> TidarLayout:
    """Lay out a packed batch for the TiDAR objective (docs/design.md, "Objective").

    Blocks are aligned to document starts: block b of a document holds its positions [b*B, (b+1)*B); the last block
    of a document may be partial. `position_ids_BS`, when given, must restart at each document start (what packing
    produces); by default they are derived from `doc_ids_BS`.
    """
    if input_ids_BS.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids_BS.shape)}")
    B, S = input_ids_BS.shape
    if not 1 <= block_size <= S:
        raise ValueError(f"block_size={block_size} does not fit sequence length {S}: need 1 <= block_size <= seq_len")
    device = input_ids_BS.device
    doc_BS = torch.zeros_like(input_ids_BS) if doc_ids_BS is None else doc_ids_BS.to(device=device, dtype=torch.long)
    if doc_BS.shape != (B, S):
        raise ValueError(f"doc_ids shape {tuple(doc_BS.shape)} does not match input_ids {(B, S)}")
    check_contiguous_docs(doc_BS)
    pos_BS = positions_from_docs(doc_BS) if position_ids_BS is None else position_ids_BS.to(device).long()
    if draft_mask_BS is None:
        draft_mask_BS = torch.ones(B, S, dtype=torch.bool, device=device)

    idx_BS = torch.arange(S, device=device).expand(B, S)
    block_start_BS = pos_BS - pos_BS % block_size
    same_doc_prev_BS = torch.zeros(B, S, dtype=torch.bool, device=device)
    same_doc_prev_BS[:, 1:] = (doc_BS[:, 1:] == doc_BS[:, :-1]) & (pos_BS[:, 1:] > 0)

    clean = TokenMeta(
        doc=doc_BS,
        pos=pos_BS,
        is_draft=torch.zeros(B, S, dtype=torch.bool, device=device),
        block=torch.full_like(pos_BS, -1),
        ctx=pos_BS + 1,
    )
    # Draft block ids: unique per (document, block) in a row. Document ids are small non-negative ints (or -1).
    draft = TokenMeta(
        doc=doc_BS,
        pos=pos_BS,
        is_draft=torch.ones(B, S, dtype=torch.bool, device=device),
        block=(doc_BS + 1) * (S + 1) + pos_BS // block_size,
        ctx=block_start_BS,
    )

    # Stream predecessors: the clean stream is the plain sequence; a draft token's predecessor is the previous draft
    # of its block, or, at a block's first position, the clean token before the block.
    clean_prev_BS = torch.where(same_doc_prev_BS, idx_BS - 1, torch.full_like(idx_BS, -1))
    draft_prev_BS = torch.where(pos_BS > block_start_BS, S + idx_BS - 1, clean_prev_BS)

    draft_ids_BS = torch.where(draft_mask_BS, torch.full_like(input_ids_BS, mask_token_id), input_ids_BS)
    return TidarLayout(
        input_ids_BL=torch.cat([input_ids_BS, draft_ids_BS], dim=1),
        position_ids_BL=torch.cat([pos_BS, pos_BS], dim=1),
        meta=TokenMeta.cat([clean, draft]),
        prev_BL=torch.cat([clean_prev_BS, draft_prev_BS], dim=1),
        draft_mask_BS=draft_mask_BS,
        seq_len=S,
    )


def causal_meta(doc_ids_BS: torch.Tensor, position_ids_BS: torch.Tensor) -> TokenMeta:
    """Records for a plain AR (clean-only) sequence: causal attention within each document."""
    check_contiguous_docs(doc_ids_BS)
    return TokenMeta(
        doc=doc_ids_BS.long(),
        pos=position_ids_BS.long(),
        is_draft=torch.zeros_like(doc_ids_BS, dtype=torch.bool),
        block=torch.full_like(doc_ids_BS, -1, dtype=torch.long),
        ctx=position_ids_BS.long() + 1,
    )
