"""`TidarLM`: the model adapter the objective, the trainer and the decoder share. It computes no loss.

It wraps an unmodified transformers causal LM (kept as `.lm`, so `tidar_lm.lm` is exactly what the export writes)
and feeds it the TiDAR layout through the model's own forward arguments: input ids, position ids and a 4D attention
mask (or flex BlockMask), plus the stream index for architectures with an adapter (ZAYA).

- `tidar_hidden(...)`: the `[clean | draft]` layout of a packed batch -> final hidden states (and router logits).
- `causal_hidden(...)`: the plain document-masked causal forward of the same model -> hidden states.
- `forward(...)`: logits of both streams (tests, analysis); the losses live in `ar2diff.objective.TidarObjective`.
- `step(...)`: a forward over arbitrary token records with an optional KV cache (the decoder's step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ar2diff.model.attention import attention_mask_for
from ar2diff.model.layout import (
    TidarLayout,
    TokenMeta,
    build_tidar_layout,
    causal_meta,
    positions_from_docs,
    sample_draft_mask,
)
from ar2diff.model.loading import SUPPORTED_MODEL_TYPES, check_model_type, max_positions
from ar2diff.model.split_attention import split_mask
from ar2diff.model.zaya import PREV_KWARG, install_zaya_adapter


@dataclass
class TidarLogits:
    ar_logits: torch.Tensor  # (B, S, V): the clean stream, next-token logits
    diff_logits: torch.Tensor  # (B, S, V): the draft stream, each position's own-token logits
    layout: TidarLayout


class TidarLM(nn.Module):
    """A causal LM converted for TiDAR training and decoding. Holds no DeepSpeed and no loss.

    mask_token_id is None for an AR base (no [MASK] yet): such a model runs `causal_hidden` and `step` only.
    """

    def __init__(self, lm: nn.Module, mask_token_id: int | None, block_size: int):
        super().__init__()
        model_type = lm.config.model_type
        check_model_type(model_type)
        vocab = lm.get_input_embeddings().weight.shape[0]
        if mask_token_id is not None and not 0 <= mask_token_id < vocab:
            raise ValueError(f"mask_token_id={mask_token_id} is outside the model's vocabulary of {vocab}; add the "
                             "mask token with ar2diff.model.add_mask_token first")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.lm = lm
        self.mask_token_id = mask_token_id
        self.block_size = block_size
        self.has_adapter = SUPPORTED_MODEL_TYPES[model_type]
        if model_type == "zaya":
            install_zaya_adapter(lm)

    @property
    def config(self):
        return self.lm.config

    @property
    def head(self) -> nn.Module:
        return self.lm.get_output_embeddings()

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

    def mask_argument(self, q_meta: TokenMeta, k_meta: TokenMeta, impl: str | None = None,
                       split: int | None = None):
        """The attention mask in the shape this architecture's forward takes (a dict per layer type for some).
        `impl` overrides the model's attention implementation (sequence parallelism wraps it). `split` = S marks
        the records as the `[clean | draft]` training layout of split S, whose SDPA skips the blocks its mask leaves
        empty (`ar2diff.model.split_attention`)."""
        impl = impl or self.config._attn_implementation
        dtype = self.lm.get_input_embeddings().weight.dtype
        if split is not None and impl == "sdpa" and k_meta is q_meta:
            mask = split_mask(q_meta, split, dtype)
        else:
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
                      prev_BT: torch.Tensor | None = None, past_key_values=None, want_router_logits: bool = False,
                      split: int | None = None):
        """`step` up to the final norm: (hidden_BTH, router_logits, cache), for losses that apply the head in
        chunks. `split`: see `mask_argument`."""
        kwargs = {}
        if prev_BT is not None and self.has_adapter:
            kwargs[PREV_KWARG] = prev_BT
        if want_router_logits:
            kwargs["output_router_logits"] = True
        out = self.lm.base_model(
            input_ids=input_ids_BT,
            position_ids=position_ids_BT,
            attention_mask=self.mask_argument(q_meta, q_meta if k_meta is None else k_meta, split=split),
            past_key_values=past_key_values,
            use_cache=past_key_values is not None,
            **kwargs,
        )
        return out.last_hidden_state, getattr(out, "router_logits", None), out.past_key_values

    # --- the training-side forwards ---------------------------------------------------------------------------
    def tidar_hidden(self, input_ids, doc_ids=None, position_ids=None, draft_mask=None,
                     want_router_logits: bool = False):
        """(layout, hidden_BLH, router_logits) of the `[clean | draft]` layout of a packed (B, S) batch; L = 2S.

        draft_mask (B, S) says which draft positions hold [MASK] (default: all of them)."""
        if self.mask_token_id is None:
            raise ValueError("this model has no mask token (an AR base): add it with ar2diff.model.add_mask_token")
        self.check_input(input_ids)
        doc_ids = torch.zeros_like(input_ids) if doc_ids is None else doc_ids.long()
        if draft_mask is None:
            draft_mask = sample_draft_mask(tuple(input_ids.shape), 1.0, device=input_ids.device)
        layout = build_tidar_layout(input_ids, self.mask_token_id, self.block_size, doc_ids, position_ids,
                                    draft_mask)
        hidden_BLH, router_logits, _ = self.hidden_states(layout.input_ids_BL, layout.position_ids_BL, layout.meta,
                                                          prev_BT=layout.prev_BL,
                                                          want_router_logits=want_router_logits,
                                                          split=input_ids.shape[1])
        return layout, hidden_BLH, router_logits

    def causal_hidden(self, input_ids, doc_ids=None, position_ids=None, want_router_logits: bool = False):
        """(hidden_BSH, router_logits) of the plain causal forward (document-masked when doc_ids are given)."""
        self.check_input(input_ids)
        doc_ids = torch.zeros_like(input_ids) if doc_ids is None else doc_ids.long()
        position_ids = positions_from_docs(doc_ids) if position_ids is None else position_ids.long()
        meta = causal_meta(doc_ids, position_ids)
        prev = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids) - 1
        prev = torch.where((position_ids > 0), prev, torch.full_like(prev, -1))
        hidden, router_logits, _ = self.hidden_states(input_ids, position_ids, meta, prev_BT=prev,
                                                      want_router_logits=want_router_logits)
        return hidden, router_logits

    def causal_logits(self, input_ids, doc_ids=None, position_ids=None) -> torch.Tensor:
        """(B, S, V) next-token logits of the plain causal forward (scoring: held-out loss by position, lm-eval)."""
        return self.head(self.causal_hidden(input_ids, doc_ids, position_ids)[0])

    def forward(self, input_ids, doc_ids=None, position_ids=None, draft_mask=None) -> TidarLogits:
        """Logits of both streams of the TiDAR layout (no loss; see ar2diff.objective.TidarObjective)."""
        layout, hidden_BLH, _ = self.tidar_hidden(input_ids, doc_ids, position_ids, draft_mask)
        S = input_ids.shape[1]
        logits_BLV = self.head(hidden_BLH)
        return TidarLogits(ar_logits=logits_BLV[:, :S], diff_logits=logits_BLV[:, S:], layout=layout)
