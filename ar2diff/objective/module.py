"""`TidarObjective`, the module DeepSpeed wraps: a `TidarLM` (the model adapter) plus the hybrid loss of
`ar2diff.objective.losses`, the draft-mask sampling, loss chunking and the router balancing term. Under sequence
parallelism its forward computes the rank's share (`ar2diff.objective.sharded`)."""

from __future__ import annotations

import sys

import torch
from torch import nn

from ar2diff.model.layout import sample_draft_mask
from ar2diff.model.tidar import TidarLM
from ar2diff.objective.losses import DiffTarget, LossTerms, TidarOutput, ar_loss, tidar_loss
from ar2diff.objective.sharded import sharded_tidar_loss


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
            terms = tidar_loss(*hidden_BLH.split(S, dim=1), *targets, alpha=self.alpha, aux_loss=aux,
                               aux_coef=self.aux_coef, diff_target=self.diff_target, head=head,
                               chunk_size=self.loss_chunk_size)
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
