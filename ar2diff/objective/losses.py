"""The TiDAR hybrid loss (arXiv 2511.08923, docs/design.md "Objective").

    L = (alpha * mean(L_AR) + mean(L_diff)) / (1 + alpha)  [+ aux_coef * L_router]

L_AR is next-token cross-entropy on the clean stream; L_diff is cross-entropy of each masked draft position
against the clean token at its own position. Both are means over the positions that count: a position counts when
its target token is real (not padding), in the same document (AR never predicts across a document boundary), and
inside the loss mask (SFT: responses only). A term with no counted position is 0, not NaN.

These are pure functions of logits or hidden states: `ar2diff.objective.module.TidarObjective` (what DeepSpeed
wraps) and `ar2diff.objective.sharded` (a rank's share under sequence parallelism) both assemble the loss with
`hybrid_terms`. The model computes hidden states; the objective decides what they are scored against.

Drafter-verifier alignment (`DiffTarget`, config `objective.diff_target`): lossless acceptance is min(1, p/q), so
the drafter q should match the verifier p, not only the data. The AR distribution for the very token a mask at
position i predicts is computed in the same forward by the clean stream at position i-1, p(. | x_<i). With
lambda = 0 (data), 1 (ar) or objective.diff_target_weight (mix) and temperature tau:

    L_diff = mean_i [ (1 - lambda) * CE(q_i, x_i) + lambda * H(sg[softmax(z_AR_{i-1} / tau)], q_i) ]

sg = stop-gradient: the teacher is detached, so alignment moves only the drafter. A position whose AR prediction
does not exist (a document's first token) keeps the data target. `LossTerms.diff_data` is always the data CE, so
held-out diffusion losses stay comparable across targets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ar2diff.config.schema import DIFF_TARGETS
from ar2diff.model.layout import TidarLayout


@dataclass(frozen=True)
class DiffTarget:
    """What the diffusion stream is trained toward (module docstring): the clean token (data), the detached AR
    distribution of the same forward at temperature `temperature` (ar), or a blend with AR weight `weight` (mix)."""

    kind: str = "data"
    weight: float = 0.5
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in DIFF_TARGETS:
            raise ValueError(f"objective.diff_target={self.kind!r} must be one of {DIFF_TARGETS}")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"objective.diff_target_weight={self.weight} must lie in [0, 1]")
        if not self.temperature > 0:
            raise ValueError(f"objective.diff_target_temperature={self.temperature} must be > 0")

    @property
    def ar_weight(self) -> float:
        """lambda: the weight of the AR soft target."""
        return {"data": 0.0, "ar": 1.0, "mix": self.weight}[self.kind]


def teacher_rows(ar_valid_BS: torch.Tensor) -> torch.Tensor:
    """has_teacher_BS: position i has an AR prediction of its token, made at clean position i-1 (same document,
    target counted) -- ar_valid shifted right by one."""
    out = torch.zeros_like(ar_valid_BS)
    out[:, 1:] = ar_valid_BS[:, :-1]
    return out


def aligned_ce(diff_logits_NV: torch.Tensor, labels_N: torch.Tensor, teacher_logits_NV: torch.Tensor | None,
               has_teacher_N: torch.Tensor | None, target: DiffTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token diffusion loss under `target`, per-token data CE), both fp32. The teacher logits are detached."""
    data_ce = F.cross_entropy(diff_logits_NV.float(), labels_N, reduction="none")
    lam = target.ar_weight
    if lam == 0.0 or teacher_logits_NV is None:
        return data_ce, data_ce.detach()
    p_NV = torch.softmax(teacher_logits_NV.detach().float() / target.temperature, dim=-1)
    soft_ce = -(p_NV * torch.log_softmax(diff_logits_NV.float(), dim=-1)).sum(-1)
    lam_N = has_teacher_N.float() * lam
    return (1 - lam_N) * data_ce + lam_N * soft_ce, data_ce.detach()


@dataclass
class LossTerms:
    loss: torch.Tensor  # what backward() is called on
    ar: torch.Tensor
    diff: torch.Tensor
    aux: torch.Tensor
    n_ar: int
    n_diff: int
    diff_data: torch.Tensor | None = None  # data CE of the diffusion stream (== diff for diff_target=data)

    def log_dict(self) -> dict[str, float]:
        out = {"loss": float(self.loss.detach()), "loss_ar": float(self.ar), "loss_diff": float(self.diff),
               "loss_aux": float(self.aux), "tokens_ar": self.n_ar, "tokens_diff": self.n_diff}
        if self.diff_data is not None:
            out["loss_diff_data"] = float(self.diff_data)
        return out


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


def chunked_aligned_ce(hidden_NH: torch.Tensor, labels_N: torch.Tensor, head, chunk_size: int,
                       teacher_hidden_NH: torch.Tensor, has_teacher_N: torch.Tensor,
                       target: DiffTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """`aligned_ce` per chunk under activation checkpointing (as `chunked_token_ce`): the teacher rows (clean hidden
    at i-1) go through the head without gradient in the same chunk, so one chunk's two logit blocks exist at a time.
    Returns (per-token loss, per-token data CE)."""

    def ce(h, y, t, m):
        with torch.no_grad():
            teacher = head(t)
        return torch.stack(aligned_ce(head(h), y, teacher, m, target))

    parts = [checkpoint(ce, h, y, t, m, use_reentrant=False)
             for h, y, t, m in zip(hidden_NH.split(chunk_size), labels_N.split(chunk_size),
                                   teacher_hidden_NH.split(chunk_size), has_teacher_N.split(chunk_size))]
    if not parts:
        empty = hidden_NH.new_zeros(0, dtype=torch.float32)
        return empty, empty
    both = torch.cat(parts, dim=1)
    return both[0], both[1].detach()


# --- one assembly of the hybrid loss, shared by the unsharded and the sequence-parallel objective ----------------
def ce_sum(x_N: torch.Tensor, labels_N: torch.Tensor, head=None, chunk_size: int | None = None) -> torch.Tensor:
    """Summed cross-entropy (fp32) of `x_N` itself when `head` is None (x are logits: one fused reduction), else of
    head(x) per token (chunked under activation checkpointing with `chunk_size`)."""
    if head is None:
        return F.cross_entropy(x_N.float(), labels_N, reduction="sum")
    if chunk_size:
        return chunked_token_ce(x_N, labels_N, head, chunk_size).sum()
    return F.cross_entropy(head(x_N).float(), labels_N, reduction="none").sum()


def draft_ce_sums(draft_N: torch.Tensor, labels_N: torch.Tensor, teacher: Callable[[], torch.Tensor],
                  has_teacher_N: torch.Tensor, target: DiffTarget, head=None,
                  chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed diffusion loss under `target`, summed data CE): the one place the diffusion target is chosen.
    `draft_N` are logits when `head` is None, else final hidden states; `teacher()` gives the AR teacher rows in the
    same form (logits or hidden at i-1), called only when the target needs them."""
    if target.ar_weight == 0.0:
        ce = ce_sum(draft_N, labels_N, head, chunk_size)
        return ce, ce.detach()
    teacher_N = teacher()
    if head is None:
        per_tok, data_ce = aligned_ce(draft_N, labels_N, teacher_N, has_teacher_N, target)
    elif chunk_size:
        per_tok, data_ce = chunked_aligned_ce(draft_N, labels_N, head, chunk_size, teacher_N, has_teacher_N, target)
    else:
        with torch.no_grad():
            teacher_NV = head(teacher_N)
        per_tok, data_ce = aligned_ce(head(draft_N), labels_N, teacher_NV, has_teacher_N, target)
    return per_tok.sum(), data_ce.sum()


def combine(ar, diff, alpha, aux_loss, aux_coef, n_ar, n_diff, diff_data=None) -> LossTerms:
    """L = (alpha * L_AR + L_diff) / (1 + alpha) + aux_coef * L_router."""
    if alpha < 0:
        raise ValueError(f"objective.alpha must be >= 0, got {alpha}")
    aux = ar.new_zeros(()) if aux_loss is None else aux_loss.float()
    loss = (alpha * ar + diff) / (1.0 + alpha) + aux_coef * aux
    return LossTerms(loss=loss, ar=ar.detach(), diff=diff.detach(), aux=aux.detach(), n_ar=n_ar, n_diff=n_diff,
                     diff_data=diff.detach() if diff_data is None else diff_data.detach())


def share(ce_sum_: torch.Tensor, count: int, total: int, anchor: torch.Tensor) -> torch.Tensor:
    """ce_sum_ / total, the whole row's count (the sum may cover `count` of them: one rank's part); 0 with a graph
    when nothing counts here."""
    if total == 0 or count == 0:
        return anchor.sum() * 0.0
    return ce_sum_ / total


def hybrid_terms(clean_N: torch.Tensor, ar_labels_N: torch.Tensor, draft_N: torch.Tensor,
                 diff_labels_N: torch.Tensor, teacher: Callable[[], torch.Tensor], has_teacher_N: torch.Tensor, *,
                 n_ar: int, n_diff: int, anchors: tuple[torch.Tensor, torch.Tensor], alpha: float,
                 aux_loss: torch.Tensor | None, aux_coef: float, diff_target: DiffTarget, head=None,
                 chunk_size: int | None = None, counts: tuple[int, int] | None = None) -> LossTerms:
    """The hybrid loss from the counted positions of both streams (logits, or hidden states with `head`): means over
    the row's counts `n_ar`, `n_diff`. Under sequence parallelism a rank passes its own positions with the row's
    counts, so the ranks' terms sum to the row's; `counts` are the token counts it logs (default: n_ar, n_diff)."""
    loss_sum, data_sum = draft_ce_sums(draft_N, diff_labels_N, teacher, has_teacher_N, diff_target, head,
                                       chunk_size)
    ar = share(ce_sum(clean_N, ar_labels_N, head, chunk_size), len(clean_N), n_ar, anchors[0])
    diff = share(loss_sum, len(draft_N), n_diff, anchors[1])
    diff_data = share(data_sum, len(draft_N), n_diff, anchors[1])
    return combine(ar, diff, alpha, aux_loss, aux_coef, *(counts or (n_ar, n_diff)), diff_data)


def tidar_loss(
    ar_BSX: torch.Tensor,
    diff_BSX: torch.Tensor,
    input_ids_BS: torch.Tensor,
    doc_ids_BS: torch.Tensor,
    loss_mask_BS: torch.Tensor,
    draft_mask_BS: torch.Tensor,
    alpha: float = 1.0,
    aux_loss: torch.Tensor | None = None,
    aux_coef: float = 0.0,
    diff_target: DiffTarget = DiffTarget(),
    head=None,
    chunk_size: int | None = None,
) -> LossTerms:
    """The hybrid objective (module docstring) of a whole row: from the two streams' logits, or from their final
    hidden states with `head` (only the positions that count go through it, in chunks of `chunk_size`).
    `aux_loss` is the router balancing loss, if any."""
    ar_labels, ar_valid = ar_targets(input_ids_BS, doc_ids_BS, loss_mask_BS)
    diff_labels, diff_valid = diff_targets(input_ids_BS, doc_ids_BS, loss_mask_BS, draft_mask_BS)
    teacher_BSX = lambda: torch.cat([ar_BSX[:, :1], ar_BSX[:, :-1]], dim=1)[diff_valid]  # noqa: E731 (AR at i-1)
    return hybrid_terms(ar_BSX[ar_valid], ar_labels[ar_valid], diff_BSX[diff_valid], diff_labels[diff_valid],
                        teacher_BSX, teacher_rows(ar_valid)[diff_valid], n_ar=int(ar_valid.sum()),
                        n_diff=int(diff_valid.sum()), anchors=(ar_BSX, diff_BSX), alpha=alpha, aux_loss=aux_loss,
                        aux_coef=aux_coef, diff_target=diff_target, head=head, chunk_size=chunk_size)


def ar_loss(logits_BSV, input_ids_BS, doc_ids_BS, loss_mask_BS) -> tuple[torch.Tensor, int]:
    """Plain next-token loss with the same target rules (AR pretraining and held-out AR loss)."""
    return masked_mean_ce(logits_BSV, *ar_targets(input_ids_BS, doc_ids_BS, loss_mask_BS))


@dataclass
class TidarOutput:
    loss: torch.Tensor
    terms: LossTerms | None
    ar_logits: torch.Tensor | None = None  # (B, S, V)
    diff_logits: torch.Tensor | None = None  # (B, S, V)
    layout: TidarLayout | None = None
