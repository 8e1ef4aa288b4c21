"""`TidarLM`: the one model-facing API the trainer and the decoder share.

It wraps an unmodified transformers causal LM (kept as `.lm`, so `tidar_lm.lm` is exactly what the export writes)
and feeds it the TiDAR layout through the model's own forward arguments: input ids, position ids and a 4D attention
mask (or flex BlockMask), plus the stream index for architectures with an adapter (ZAYA).

- `forward(...)`: the training forward: TiDAR layout -> AR logits, diffusion logits, hybrid loss terms.
- `forward_ar(...)`: the plain causal forward of the same model (AR pretraining, held-out AR loss, parity checks).
- `step(...)`: a forward over arbitrary token records with an optional KV cache (the decoder's step).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from ar2diff.model.attention import attention_mask_for
from ar2diff.model.layout import (TidarLayout, TokenMeta, build_tidar_layout, causal_meta, positions_from_docs,
                                  sample_draft_mask)
from ar2diff.model.loading import SUPPORTED_MODEL_TYPES, check_model_type, max_positions
from ar2diff.model.zaya import PREV_KWARG, install_zaya_adapter
from ar2diff.objective import DiffTarget, LossTerms, ar_loss, tidar_loss, tidar_loss_from_hidden


@dataclass
class TidarOutput:
    loss: torch.Tensor
    terms: LossTerms | None
    ar_logits: torch.Tensor | None = None  # (B, S, V)
    diff_logits: torch.Tensor | None = None  # (B, S, V)
    layout: TidarLayout | None = None


class TidarLM(nn.Module):
    """A causal LM converted for TiDAR training and decoding. Holds no DeepSpeed: wrap it in an engine outside."""

    def __init__(self, lm: nn.Module, mask_token_id: int | None, block_size: int, alpha: float = 1.0,
                 mask_ratio: float = 1.0, aux_coef: float | None = None, objective: str = "tidar",
                 loss_chunk_size: int | None = None, diff_target: DiffTarget = DiffTarget()):
        super().__init__()
        model_type = lm.config.model_type
        check_model_type(model_type)
        if objective not in ("tidar", "ar"):
            raise ValueError(f"objective={objective!r} must be 'tidar' or 'ar'")
        vocab = lm.get_input_embeddings().weight.shape[0]
        if objective == "tidar" and (mask_token_id is None or not 0 <= mask_token_id < vocab):
            raise ValueError(f"mask_token_id={mask_token_id} is outside the model's vocabulary of {vocab}; add the "
                             "mask token with ar2diff.model.add_mask_token first")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise ValueError(f"objective.loss_chunk_tokens={loss_chunk_size} must be >= 1 or null (no chunking)")
        self.lm = lm
        self.objective = objective
        self.loss_chunk_size = loss_chunk_size
        self.mask_token_id = mask_token_id
        self.block_size = block_size
        self.alpha = alpha
        self.mask_ratio = mask_ratio
        self.diff_target = diff_target  # what the diffusion stream is trained toward (objective.diff_target)
        self.has_adapter = SUPPORTED_MODEL_TYPES[model_type]
        if model_type == "zaya":
            install_zaya_adapter(lm)
        self.balancing_loss_fn = getattr(sys.modules[type(lm).__module__], "load_balancing_loss_func", None)
        default_coef = getattr(lm.config, "router_aux_loss_coef", 0.0) if self.balancing_loss_fn else 0.0
        self.aux_coef = default_coef if aux_coef is None else aux_coef

    @property
    def config(self):
        return self.lm.config

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        """Activation checkpointing of the wrapped model's layers (the stream index travels with each call)."""
        self.lm.gradient_checkpointing_enable(**kwargs)

    # --- the pieces -------------------------------------------------------------------------------------------
    def check_input(self, input_ids_BS: torch.Tensor, length: int | None = None) -> None:
        if input_ids_BS.dim() != 2 or input_ids_BS.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty (batch, seq) tensor, got {tuple(input_ids_BS.shape)}")
        limit = max_positions(self.config)
        length = input_ids_BS.shape[1] if length is None else length
        if limit is not None and length > limit:
            raise ValueError(f"sequence length {length} exceeds the model's max_position_embeddings={limit}; "
                             "shorten data.seq_len or extend the context (rope scaling) in the model config")
        vocab = self.lm.get_input_embeddings().weight.shape[0]
        if int(input_ids_BS.max()) >= vocab or int(input_ids_BS.min()) < 0:
            raise ValueError(f"token ids must lie in [0, {vocab}); got range [{int(input_ids_BS.min())}, "
                             f"{int(input_ids_BS.max())}]: the tokenizer does not match the model")

    def _mask_argument(self, q_meta: TokenMeta, k_meta: TokenMeta):
        """The attention mask in the shape this architecture's forward takes (a dict per layer type for some)."""
        impl = self.config._attn_implementation
        dtype = self.lm.get_input_embeddings().weight.dtype
        mask = attention_mask_for(impl, q_meta, k_meta, dtype=dtype)
        layer_types = getattr(self.config, "layer_types", None)
        if self.config.model_type == "zaya":
            if "hybrid_sliding" in layer_types:
                raise NotImplementedError("ZAYA sliding-window layers are not supported by the TiDAR mask")
            return {"hybrid": mask, "conv": None}
        if layer_types is not None and self.config.model_type == "qwen3":
            if set(layer_types) != {"full_attention"}:
                raise NotImplementedError("sliding-window attention layers are not supported by the TiDAR mask; "
                                          "set use_sliding_window: false")
            return {"full_attention": mask}
        if getattr(self.config, "sliding_window", None) and self.config.model_type in ("mixtral", "qwen3_moe"):
            raise NotImplementedError(f"{self.config.model_type} with sliding_window set is not supported by the "
                                      "TiDAR mask; set sliding_window: null")
        return mask

    def step(self, input_ids_BT, position_ids_BT, q_meta: TokenMeta, k_meta: TokenMeta | None = None,
             prev_BT: torch.Tensor | None = None, past_key_values=None, want_router_logits: bool = False):
        """One forward over tokens described by records. Returns (logits_BTV, router_logits, cache).

        k_meta describes every key (cached + these tokens) and defaults to q_meta. prev_BT is the stream index for
        adapter architectures (None: the model's own, plain-sequence behaviour).
        """
        hidden, router_logits, cache = self.hidden_states(input_ids_BT, position_ids_BT, q_meta, k_meta, prev_BT,
                                                          past_key_values, want_router_logits)
        return self.lm.get_output_embeddings()(hidden), router_logits, cache

    def hidden_states(self, input_ids_BT, position_ids_BT, q_meta: TokenMeta, k_meta: TokenMeta | None = None,
                      prev_BT: torch.Tensor | None = None, past_key_values=None, want_router_logits: bool = False):
        """`step` up to the final norm: (hidden_BTH, router_logits, cache), for losses that apply the head in
        chunks."""
        kwargs = {}
        if prev_BT is not None and self.has_adapter:
            kwargs[PREV_KWARG] = prev_BT
        if want_router_logits:
            kwargs["output_router_logits"] = True
        out = self.lm.base_model(
            input_ids=input_ids_BT,
            position_ids=position_ids_BT,
            attention_mask=self._mask_argument(q_meta, q_meta if k_meta is None else k_meta),
            past_key_values=past_key_values,
            use_cache=past_key_values is not None,
            **kwargs,
        )
        return out.last_hidden_state, getattr(out, "router_logits", None), out.past_key_values

    def balancing_loss(self, router_logits, valid_BL: torch.Tensor) -> torch.Tensor | None:
        """The architecture's own router balancing loss (transformers' function), padding excluded."""
        if self.balancing_loss_fn is None or router_logits is None:
            return None
        n_experts = getattr(self.config, "num_experts", None) or self.config.num_local_experts
        return self.balancing_loss_fn(router_logits, n_experts, self.config.num_experts_per_tok, valid_BL)

    # --- the two forwards -------------------------------------------------------------------------------------
    def forward(self, input_ids, doc_ids=None, position_ids=None, loss_mask=None, generator=None,
                return_logits: bool = False) -> TidarOutput:
        """Training forward on a packed (B, S) batch: the TiDAR hybrid loss over the `[clean | draft]` layout
        (or, for objective="ar", the plain next-token loss)."""
        if self.objective == "ar":
            return self.forward_ar(input_ids, doc_ids, position_ids, loss_mask, return_logits=return_logits)
        self.check_input(input_ids)
        B, S = input_ids.shape
        doc_ids = torch.zeros_like(input_ids) if doc_ids is None else doc_ids.long()
        loss_mask = torch.ones_like(input_ids, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
        draft_mask = sample_draft_mask((B, S), self.mask_ratio, generator, device=input_ids.device)
        layout = build_tidar_layout(input_ids, self.mask_token_id, self.block_size, doc_ids, position_ids,
                                    draft_mask)
        hidden_BLH, router_logits, _ = self.hidden_states(
            layout.input_ids_BL, layout.position_ids_BL, layout.meta, prev_BT=layout.prev_BL,
            want_router_logits=self.balancing_loss_fn is not None)
        aux = self.balancing_loss(router_logits, layout.meta.doc >= 0)
        head = self.lm.get_output_embeddings()
        targets = (input_ids, doc_ids, loss_mask, draft_mask)
        if self.loss_chunk_size and not return_logits:
            terms = tidar_loss_from_hidden(hidden_BLH[:, :S], hidden_BLH[:, S:], head, *targets,
                                           chunk_size=self.loss_chunk_size, alpha=self.alpha, aux_loss=aux,
                                           aux_coef=self.aux_coef, diff_target=self.diff_target)
            return TidarOutput(loss=terms.loss, terms=terms, layout=layout)
        logits_BLV = head(hidden_BLH)
        terms = tidar_loss(logits_BLV[:, :S], logits_BLV[:, S:], *targets, alpha=self.alpha, aux_loss=aux,
                           aux_coef=self.aux_coef, diff_target=self.diff_target)
        out = TidarOutput(loss=terms.loss, terms=terms, layout=layout)
        if return_logits:
            out.ar_logits, out.diff_logits = logits_BLV[:, :S], logits_BLV[:, S:]
        return out

    def forward_ar(self, input_ids, doc_ids=None, position_ids=None, loss_mask=None,
                   return_logits: bool = False) -> TidarOutput:
        """Plain causal forward (document-masked when doc_ids are given) with the next-token loss."""
        self.check_input(input_ids)
        doc_ids = torch.zeros_like(input_ids) if doc_ids is None else doc_ids.long()
        position_ids = positions_from_docs(doc_ids) if position_ids is None else position_ids.long()
        loss_mask = torch.ones_like(input_ids, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
        meta = causal_meta(doc_ids, position_ids)
        prev = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids) - 1
        prev = torch.where((position_ids > 0), prev, torch.full_like(prev, -1))
        logits, router_logits, _ = self.step(input_ids, position_ids, meta, prev_BT=prev,
                                             want_router_logits=self.balancing_loss_fn is not None)
        aux = self.balancing_loss(router_logits, doc_ids >= 0)
        ar, n = ar_loss(logits, input_ids, doc_ids, loss_mask)
        loss = ar if aux is None else ar + self.aux_coef * aux.float()
        terms = LossTerms(loss=loss, ar=ar.detach(), diff=ar.new_zeros(()),
                          aux=loss.new_zeros(()) if aux is None else aux.detach(), n_ar=n, n_diff=0)
        return TidarOutput(loss=loss, terms=terms, ar_logits=logits if return_logits else None)
