"""The TiDAR hybrid loss (arXiv 2511.08923, docs/design.md "Objective").

    L = (alpha * mean(L_AR) + mean(L_diff)) / (1 + alpha)  [+ aux_coef * L_router]

L_AR is next-token cross-entropy on the clean stream; L_diff is cross-entropy of each masked draft position
against the clean token at its own position. Both are means over the positions that count: a position counts when
its target token is real (not padding), in the same document (AR never predicts across a document boundary), and
inside the loss mask (SFT: responses only). A term with no counted position is 0, not NaN.

`TidarObjective` is the module DeepSpeed wraps: a `TidarLM` (the model adapter) plus these losses, the draft-mask
sampling, loss chunking and the router balancing term. The model computes hidden states; the objective decides what
they are scored against.

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

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ar2diff.model.layout import TidarLayout, sample_draft_mask
from ar2diff.model.tidar import TidarLM


DIFF_TARGETS = ("data", "ar", "mix")


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


def _mean_of(ce_N: torch.Tensor, anchor: torch.Tensor) -> tuple[torch.Tensor, int]:
    n = ce_N.numel()
    return (ce_N.sum() / n, n) if n else (anchor.sum() * 0.0, 0)


def combine(ar, diff, alpha, aux_loss, aux_coef, n_ar, n_diff, diff_data=None) -> LossTerms:
    """L = (alpha * L_AR + L_diff) / (1 + alpha) + aux_coef * L_router."""
    if alpha < 0:
        raise ValueError(f"objective.alpha must be >= 0, got {alpha}")
    aux = ar.new_zeros(()) if aux_loss is None else aux_loss.float()
    loss = (alpha * ar + diff) / (1.0 + alpha) + aux_coef * aux
    return LossTerms(loss=loss, ar=ar.detach(), diff=diff.detach(), aux=aux.detach(), n_ar=n_ar, n_diff=n_diff,
                     diff_data=diff.detach() if diff_data is None else diff_data.detach())


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
    diff_target: DiffTarget = DiffTarget(),
) -> LossTerms:
    """The same objective as `tidar_loss`, from final hidden states: only the positions that count go through the
    head, in chunks (`chunked_token_ce`; `chunked_aligned_ce` for an AR or mixed diffusion target)."""
    ar_labels, ar_valid = ar_targets(input_ids_BS, doc_ids_BS, loss_mask_BS)
    diff_labels, diff_valid = diff_targets(input_ids_BS, doc_ids_BS, loss_mask_BS, draft_mask_BS)
    ar, n_ar = _mean_of(chunked_token_ce(clean_hidden_BSH[ar_valid], ar_labels[ar_valid], head, chunk_size),
                        clean_hidden_BSH)
    if diff_target.ar_weight == 0.0:
        diff, n_diff = _mean_of(
            chunked_token_ce(draft_hidden_BSH[diff_valid], diff_labels[diff_valid], head, chunk_size),
            draft_hidden_BSH)
        return combine(ar, diff, alpha, aux_loss, aux_coef, n_ar, n_diff)
    teacher_BSH = torch.cat([clean_hidden_BSH[:, :1], clean_hidden_BSH[:, :-1]], dim=1)  # clean hidden at i-1
    per_tok, data_ce = chunked_aligned_ce(draft_hidden_BSH[diff_valid], diff_labels[diff_valid], head, chunk_size,
                                          teacher_BSH[diff_valid], teacher_rows(ar_valid)[diff_valid], diff_target)
    diff, n_diff = _mean_of(per_tok, draft_hidden_BSH)
    diff_data, _ = _mean_of(data_ce, draft_hidden_BSH)
    return combine(ar, diff, alpha, aux_loss, aux_coef, n_ar, n_diff, diff_data)


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
    diff_target: DiffTarget = DiffTarget(),
) -> LossTerms:
    """The hybrid objective; see the module docstring. `aux_loss` is the router balancing loss, if any."""
    ar_labels, ar_valid = ar_targets(input_ids_BS, doc_ids_BS, loss_mask_BS)
    ar, n_ar = masked_mean_ce(ar_logits_BSV, ar_labels, ar_valid)
    diff_labels, diff_valid = diff_targets(input_ids_BS, doc_ids_BS, loss_mask_BS, draft_mask_BS)
    if diff_target.ar_weight == 0.0:
        diff, n_diff = masked_mean_ce(diff_logits_BSV, diff_labels, diff_valid)
        return combine(ar, diff, alpha, aux_loss, aux_coef, n_ar, n_diff)
    teacher_BSV = torch.cat([ar_logits_BSV[:, :1], ar_logits_BSV[:, :-1]], dim=1)  # AR logits at i-1
    per_tok, data_ce = aligned_ce(diff_logits_BSV[diff_valid], diff_labels[diff_valid], teacher_BSV[diff_valid],
                                  teacher_rows(ar_valid)[diff_valid], diff_target)
    diff, n_diff = _mean_of(per_tok, diff_logits_BSV)
    diff_data, _ = _mean_of(data_ce, diff_logits_BSV)
    return combine(ar, diff, alpha, aux_loss, aux_coef, n_ar, n_diff, diff_data)


def ar_loss(logits_BSV, input_ids_BS, doc_ids_BS, loss_mask_BS) -> tuple[torch.Tensor, int]:
    """Plain next-token loss with the same target rules (AR pretraining and held-out AR loss)."""
    return masked_mean_ce(logits_BSV, *ar_targets(input_ids_BS, doc_ids_BS, loss_mask_BS))


# --- the objective around the model: what DeepSpeed wraps ---------------------------------------------------------
@dataclass
class TidarOutput:
    loss: torch.Tensor
    terms: LossTerms | None
    ar_logits: torch.Tensor | None = None  # (B, S, V)
    diff_logits: torch.Tensor | None = None  # (B, S, V)
    layout: TidarLayout | None = None


class TidarObjective(nn.Module):
    """The training objective of one phase around a `TidarLM`: TiDAR hybrid loss (kind="tidar") or plain next-token
    loss (kind="ar"), each plus the architecture's router balancing loss (transformers' own function) when it has one.

    Its parameters are exactly the wrapped LM's, under the same names as on `TidarLM` (``lm.…``): checkpoints, the
    export and AutoEP's layer names do not change with the wrapper. The adapter itself is kept as `.model`.
    """

    def __init__(self, model: TidarLM, kind: str = "tidar", alpha: float = 1.0, mask_ratio: float = 1.0,
                 aux_coef: float | None = None, loss_chunk_size: int | None = None,
                 diff_target: DiffTarget = DiffTarget()):
        super().__init__()
        if kind not in ("tidar", "ar"):
            raise ValueError(f"objective.kind={kind!r} must be 'tidar' or 'ar'")
        if kind == "tidar" and model.mask_token_id is None:
            raise ValueError("objective.kind=tidar needs a model with a mask token; add it with "
                             "ar2diff.model.add_mask_token first")
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise ValueError(f"objective.loss_chunk_tokens={loss_chunk_size} must be >= 1 or null (no chunking)")
        self.__dict__["model"] = model  # the adapter, outside the module tree: its only parameters are lm's
        self.lm = model.lm
        self.kind, self.alpha, self.mask_ratio, self.loss_chunk_size = kind, alpha, mask_ratio, loss_chunk_size
        self.diff_target = diff_target  # what the diffusion stream is trained toward (objective.diff_target)
        lm = model.lm
        self.balancing_loss_fn = getattr(sys.modules[type(lm).__module__], "load_balancing_loss_func", None)
        default_coef = getattr(lm.config, "router_aux_loss_coef", 0.0) if self.balancing_loss_fn else 0.0
        self.aux_coef = default_coef if aux_coef is None else aux_coef
        # Set by ar2diff.trainer.sequence_parallel: forward then computes this rank's share of a sharded row.
        self.sequence_parallel = None

    @property
    def config(self):
        return self.lm.config

    def balancing_loss(self, router_logits, valid_BL: torch.Tensor) -> torch.Tensor | None:
        """The architecture's own router balancing loss (transformers' function), padding excluded."""
        if self.balancing_loss_fn is None or router_logits is None:
            return None
        n_experts = getattr(self.config, "num_experts", None) or self.config.num_local_experts
        return self.balancing_loss_fn(router_logits, n_experts, self.config.num_experts_per_tok, valid_BL)

    def forward(self, input_ids, doc_ids=None, position_ids=None, loss_mask=None, generator=None,
                return_logits: bool = False) -> TidarOutput:
        """Loss of a packed (B, S) batch: the hybrid loss over the `[clean | draft]` layout (kind="ar": forward_ar).
        `generator` draws the draft mask (mask_ratio < 1)."""
        if self.kind == "ar":
            return self.forward_ar(input_ids, doc_ids, position_ids, loss_mask, return_logits=return_logits)
        if self.sequence_parallel is not None:
            from ar2diff.objective_sharded import sharded_tidar_loss

            return sharded_tidar_loss(self, self.sequence_parallel, input_ids, doc_ids, position_ids, loss_mask,
                                      generator, return_logits)
        B, S = input_ids.shape
        doc_ids = torch.zeros_like(input_ids) if doc_ids is None else doc_ids.long()
        loss_mask = torch.ones_like(input_ids, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
        self.model.check_input(input_ids)
        draft_mask = sample_draft_mask((B, S), self.mask_ratio, generator, device=input_ids.device)
        layout, hidden_BLH, router_logits = self.model.tidar_hidden(
            input_ids, doc_ids, position_ids, draft_mask, want_router_logits=self.balancing_loss_fn is not None)
        aux = self.balancing_loss(router_logits, layout.meta.doc >= 0)
        head = self.model.head
        targets = (input_ids, doc_ids, loss_mask, draft_mask)
        # split, not two slices: a slice's backward zero-fills a gradient of the whole 2S tensor; a split's is one cat
        if self.loss_chunk_size and not return_logits:
            terms = tidar_loss_from_hidden(*hidden_BLH.split(S, dim=1), head, *targets,
                                           chunk_size=self.loss_chunk_size, alpha=self.alpha, aux_loss=aux,
                                           aux_coef=self.aux_coef, diff_target=self.diff_target)
            return TidarOutput(loss=terms.loss, terms=terms, layout=layout)
        ar_logits_BSV, diff_logits_BSV = head(hidden_BLH).split(S, dim=1)
        terms = tidar_loss(ar_logits_BSV, diff_logits_BSV, *targets, alpha=self.alpha, aux_loss=aux,
                           aux_coef=self.aux_coef, diff_target=self.diff_target)
        out = TidarOutput(loss=terms.loss, terms=terms, layout=layout)
        if return_logits:
            out.ar_logits, out.diff_logits = ar_logits_BSV, diff_logits_BSV
        return out

    def forward_ar(self, input_ids, doc_ids=None, position_ids=None, loss_mask=None,
                   return_logits: bool = False) -> TidarOutput:
        """Plain causal forward (document-masked when doc_ids are given) with the next-token loss."""
        doc_ids = torch.zeros_like(input_ids) if doc_ids is None else doc_ids.long()
        loss_mask = torch.ones_like(input_ids, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
        hidden, router_logits = self.model.causal_hidden(input_ids, doc_ids, position_ids,
                                                         want_router_logits=self.balancing_loss_fn is not None)
        logits = self.model.head(hidden)
        aux = self.balancing_loss(router_logits, doc_ids >= 0)
        ar, n = ar_loss(logits, input_ids, doc_ids, loss_mask)
        loss = ar if aux is None else ar + self.aux_coef * aux.float()
        terms = LossTerms(loss=loss, ar=ar.detach(), diff=ar.new_zeros(()),
                          aux=loss.new_zeros(()) if aux is None else aux.detach(), n_ar=n, n_diff=0)
        return TidarOutput(loss=loss, terms=terms, ar_logits=logits if return_logits else None)
