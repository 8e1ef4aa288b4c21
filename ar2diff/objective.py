"""The TiDAR hybrid loss (arXiv 2511.08923, DESIGN.md "Objective").

    L = (alpha * mean(L_AR) + mean(L_diff)) / (1 + alpha)  [+ aux_coef * L_router]

L_AR is next-token cross-entropy on the clean stream; L_diff is cross-entropy of each masked draft position
against the clean token at its own position. Both are means over the positions that count: a position counts when
its target token is real (not padding), in the same document (AR never predicts across a document boundary), and
inside the loss mask (SFT: responses only). A term with no counted position is 0, not NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class LossTerms:
    loss: torch.Tensor  # what backward() is called on
    ar: torch.Tensor
    diff: torch.Tensor
    aux: torch.Tensor
    n_ar: int
    n_diff: int

    def log_dict(self) -> dict[str, float]:
        return {"loss": float(self.loss), "loss_ar": float(self.ar), "loss_diff": float(self.diff),
                "loss_aux": float(self.aux), "tokens_ar": self.n_ar, "tokens_diff": self.n_diff}


def ar_targets(input_ids_BS, doc_ids_BS, loss_mask_BS):
    """(labels_BS, valid_BS) for next-token prediction: position t predicts token t+1 of the same document."""
    labels = torch.zeros_like(input_ids_BS)
    labels[:, :-1] = input_ids_BS[:, 1:]
    valid = torch.zeros_like(loss_mask_BS, dtype=torch.bool)
    valid[:, :-1] = (doc_ids_BS[:, 1:] == doc_ids_BS[:, :-1]) & (doc_ids_BS[:, 1:] >= 0) & loss_mask_BS[:, 1:]
    return labels, valid


def diff_targets(input_ids_BS, doc_ids_BS, loss_mask_BS, draft_mask_BS):
    """(labels_BS, valid_BS) for the diffusion stream: a masked position predicts its own clean token."""
    return input_ids_BS, draft_mask_BS & (doc_ids_BS >= 0) & loss_mask_BS


def masked_mean_ce(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, valid_BS: torch.Tensor):
    """Mean cross-entropy (fp32) over valid positions; (0, 0) when none is valid."""
    n = int(valid_BS.sum())
    if n == 0:
        return logits_BSV.sum() * 0.0, 0
    ce = F.cross_entropy(logits_BSV[valid_BS].float(), labels_BS[valid_BS], reduction="sum")
    return ce / n, n


def chunked_token_ce(hidden_NH: torch.Tensor, labels_N: torch.Tensor, head, chunk_size: int) -> torch.Tensor:
    """Per-token cross-entropy (fp32) of head(hidden) without holding all logits: the head and the loss run per
    chunk of `chunk_size` tokens under activation checkpointing, so one chunk's logits exist at a time, forward
    and backward (at 32k x 2 positions and a 262k vocabulary the full logits would not fit)."""

    def ce(h, y):
        return F.cross_entropy(head(h).float(), y, reduction="none")

    parts = [checkpoint(ce, h, y, use_reentrant=False)
             for h, y in zip(hidden_NH.split(chunk_size), labels_N.split(chunk_size))]
    return torch.cat(parts) if parts else hidden_NH.new_zeros(0, dtype=torch.float32)


def _mean_of(ce_N: torch.Tensor, anchor: torch.Tensor) -> tuple[torch.Tensor, int]:
    n = ce_N.numel()
    return (ce_N.sum() / n, n) if n else (anchor.sum() * 0.0, 0)


def combine(ar, diff, alpha, aux_loss, aux_coef, n_ar, n_diff) -> LossTerms:
    """L = (alpha * L_AR + L_diff) / (1 + alpha) + aux_coef * L_router."""
    if alpha < 0:
        raise ValueError(f"objective.alpha must be >= 0, got {alpha}")
    aux = ar.new_zeros(()) if aux_loss is None else aux_loss.float()
    loss = (alpha * ar + diff) / (1.0 + alpha) + aux_coef * aux
    return LossTerms(loss=loss, ar=ar.detach(), diff=diff.detach(), aux=aux.detach(), n_ar=n_ar, n_diff=n_diff)


def tidar_loss_from_hidden(
    clean_hidden_BSH: torch.Tensor,
    draft_hidden_BSH: torch.Tensor,
    head,
    input_ids_BS: torch.Tensor,
    doc_ids_BS: torch.Tensor,
    loss_mask_BS: torch.Tensor,
    draft_mask_BS: torch.Tensor,
    chunk_size: int,
    alpha: float = 1.0,
    aux_loss: torch.Tensor | None = None,
    aux_coef: float = 0.0,
) -> LossTerms:
    """The same objective as `tidar_loss`, from final hidden states: only the positions that count go through the
    head, in chunks (`chunked_token_ce`)."""
    ar_labels, ar_valid = ar_targets(input_ids_BS, doc_ids_BS, loss_mask_BS)
    diff_labels, diff_valid = diff_targets(input_ids_BS, doc_ids_BS, loss_mask_BS, draft_mask_BS)
    ar, n_ar = _mean_of(chunked_token_ce(clean_hidden_BSH[ar_valid], ar_labels[ar_valid], head, chunk_size),
                        clean_hidden_BSH)
    diff, n_diff = _mean_of(
        chunked_token_ce(draft_hidden_BSH[diff_valid], diff_labels[diff_valid], head, chunk_size), draft_hidden_BSH)
    return combine(ar, diff, alpha, aux_loss, aux_coef, n_ar, n_diff)


def tidar_loss(
    ar_logits_BSV: torch.Tensor,
    diff_logits_BSV: torch.Tensor,
    input_ids_BS: torch.Tensor,
    doc_ids_BS: torch.Tensor,
    loss_mask_BS: torch.Tensor,
    draft_mask_BS: torch.Tensor,
    alpha: float = 1.0,
    aux_loss: torch.Tensor | None = None,
    aux_coef: float = 0.0,
) -> LossTerms:
    """The hybrid objective; see the module docstring. `aux_loss` is the router balancing loss, if any."""
    ar, n_ar = masked_mean_ce(ar_logits_BSV, *ar_targets(input_ids_BS, doc_ids_BS, loss_mask_BS))
    diff, n_diff = masked_mean_ce(
        diff_logits_BSV, *diff_targets(input_ids_BS, doc_ids_BS, loss_mask_BS, draft_mask_BS))
    return combine(ar, diff, alpha, aux_loss, aux_coef, n_ar, n_diff)


def ar_loss(logits_BSV, input_ids_BS, doc_ids_BS, loss_mask_BS) -> tuple[torch.Tensor, int]:
    """Plain next-token loss with the same target rules (AR pretraining and held-out AR loss)."""
    return masked_mean_ce(logits_BSV, *ar_targets(input_ids_BS, doc_ids_BS, loss_mask_BS))
