"""ZAYA's CCA projection mixes neighbouring positions outside attention; this adapter makes it stream-aware.

CCA (transformers `ZayaCCAProjection`) convolves q/k causally over the sequence (depthwise then grouped conv, a
look-back of `(cca_time0 - 1) + (cca_time1 - 1)` positions) and takes half of each value head from the previous
position. In the concatenated TiDAR layout `[clean | draft]` "the previous position" would be wrong for the draft
copy and across packed documents, so the adapter recomputes those two sequence-mixing steps along each token's own
stream predecessors (`TidarLayout.prev_BL`): inside a draft block the previous draft, at a block's first position
the clean token before the block, -1 (zeros, exactly like the model's own left padding) at a document start.

Nothing else in ZAYA mixes positions (the router state carried across layers is per position), and the clean
stream goes through exactly the model's own arithmetic: the adapter only re-indexes the convolution window and the
delayed value. It is installed as module hooks on an unmodified transformers model and is active only for forwards
that pass `ar2diff_stream_prev=`; the index travels with the call, so activation-checkpointing recomputes see it too.

With a transformers cache (TiDAR decoding; idea: Zyphra's vLLM `commit_spec_decode_state`) the forward feeds only
the new tokens and `prev` is relative to them: -1 is the newest cached token, whose conv window and delayed value
the cache holds (zeros before any state, exactly as without a cache). The window is taken over `[cached conv state |
new tokens]`, the very tensor transformers builds, so the cached and recomputed forwards do the same arithmetic.
transformers then stores the state of the last fed token, which in a TiDAR step is a template's; the forward
therefore stashes every fed token's conv input and delayed value, and `commit_stream_state` puts the state of the
committed token (t_last or the last accepted draft) into the cache once the verifier has decided: rejected drafts
and templates leave no trace.
"""

from __future__ import annotations

import torch
from torch import nn

from ar2diff.model.zaya_halo import HALO_KWARG

PREV_KWARG = "ar2diff_stream_prev"


def _windows(prev_BT: torch.Tensor, width: int) -> torch.Tensor:
    """(B, T, width) indices of each token's last `width` stream ancestors, oldest first, itself last; -1 = none."""
    B, T = prev_BT.shape
    cols = [torch.arange(T, device=prev_BT.device).expand(B, T)]
    for _ in range(width - 1):
        last = cols[-1]
        cols.append(torch.where(last >= 0, prev_BT.gather(1, last.clamp(min=0)), last))
    return torch.stack(cols[::-1], dim=-1)


def _gather_tokens(x_BTD: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[b, idx[b, ...]] with zeros where idx == -1. idx is (B, T, ...) -> (B, T, ..., D)."""
    B, T, D = x_BTD.shape
    padded = torch.cat([x_BTD.new_zeros(B, 1, D), x_BTD], dim=1)
    flat = (idx + 1).reshape(B, -1)
    out = padded.gather(1, flat[..., None].expand(-1, -1, D))
    return out.reshape(*idx.shape, D)


class _CCAStreams:
    """Hooks on one `ZayaCCAProjection` (see module docstring)."""

    def __init__(self, attn: nn.Module):
        self.proj = attn.qkv_proj
        self.layer_idx = attn.qkv_proj.layer_idx
        self.prev_BT: torch.Tensor | None = None
        self.qk_padded: torch.Tensor | None = None
        self.start_state: torch.Tensor | None = None  # the cache's delayed value of the newest cached token
        self.stash: tuple[torch.Tensor, torch.Tensor] | None = None  # (conv input (B, C, W-1+T), delayed (B, T, D))
        self.keep_stash = False
        self.halo = None  # sequence parallelism: prev_BT then indexes [previous rank's halo | local tokens]
        attn.register_forward_pre_hook(self._take_prev, with_kwargs=True)
        attn.register_forward_hook(self._drop_prev, always_call=True)
        self.proj.conv_qk_depthwise.register_forward_pre_hook(self._capture_conv_input)
        self.proj.conv_qk_grouped.register_forward_hook(self._stream_conv)
        self.proj.register_forward_hook(self._stream_value, with_kwargs=True)

    def _take_prev(self, module, args, kwargs):
        self.prev_BT = kwargs.get(PREV_KWARG)
        self.halo = kwargs.get(HALO_KWARG)
        cache = kwargs.get("past_key_values")
        self.start_state = None
        self.stash = None
        if self.prev_BT is not None and cache is not None and cache.has_previous_state(self.layer_idx):
            # transformers overwrites it in place during the forward; the new tokens need the committed one
            self.start_state = cache.layers[self.layer_idx].recurrent_states[0].clone()
        self.keep_stash = self.prev_BT is not None and cache is not None

    def _drop_prev(self, module, args, output):
        self.prev_BT = None
        self.qk_padded = None
        self.start_state = None
        self.halo = None

    def _extend(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """Local tokens, with the previous rank's halo in front under sequence parallelism (ar2diff.model.zaya_halo)."""
        return x_BTD if self.halo is None else self.halo.extend(x_BTD)

    def _capture_conv_input(self, module, args):
        if self.prev_BT is not None:
            self.qk_padded = args[0]

    def _stream_conv(self, module, args, output):
        if self.prev_BT is None:
            return None
        dw, grouped = self.proj.conv_qk_depthwise, self.proj.conv_qk_grouped
        lookback = self.proj.conv_kernel_size
        if self.halo is not None:  # sequence parallelism (training, no cache): [halo | local tokens]
            qk_BCT = self.qk_padded[..., lookback:]  # drop the model's own left zero-padding
            B, C, T = qk_BCT.shape
            win_BTW = _windows(self.prev_BT, lookback + 1)[:, -T:]
            x = _gather_tokens(self._extend(qk_BCT.transpose(1, 2)), win_BTW)  # (B, T, W, C)
        else:
            E_BCT = self.qk_padded  # [look-back state (zeros, or the cached window) | fed tokens]
            B, C, _ = E_BCT.shape
            T = self.prev_BT.shape[1]
            state_prev = torch.arange(-1, lookback - 1, device=E_BCT.device).expand(B, lookback)
            prev_E = torch.cat([state_prev, self.prev_BT + lookback], dim=1)
            win_BTW = _windows(prev_E, lookback + 1)[:, lookback:]
            x = _gather_tokens(E_BCT.transpose(1, 2), win_BTW)  # (B, T, W, C)
        x = x.reshape(B * T, lookback + 1, C).transpose(1, 2)
        y = grouped._conv_forward(dw._conv_forward(x, dw.weight, dw.bias), grouped.weight, grouped.bias)
        return y.reshape(B, T, C).transpose(1, 2)

    def _stream_value(self, module, args, kwargs, output):
        if self.prev_BT is None:
            return None
        query, key, value = output
        hidden_BTH = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        B, T, _ = hidden_BTH.shape
        delayed_BTD = self.proj.v_proj_delayed(hidden_BTH)
        if self.start_state is not None:
            start_D = self.start_state[:, None, :]
        else:
            start_D = self.proj.v_proj_delayed(hidden_BTH.new_zeros(1, 1, hidden_BTH.shape[-1]))
        prev = self.prev_BT[:, -T:]  # under sequence parallelism prev_BT also covers the halo rows
        source_BSD = self._extend(delayed_BTD)
        shifted = torch.where((prev >= 0)[..., None], source_BSD.gather(
            1, prev.clamp(min=0)[..., None].expand(-1, -1, source_BSD.shape[-1])), start_D)
        value_flat = value.reshape(B, T, -1)
        half = value_flat.shape[-1] - shifted.shape[-1]
        value = torch.cat([value_flat[..., :half], shifted], dim=-1).view_as(value)
        if self.keep_stash:
            self.stash = (self.qk_padded, delayed_BTD)
        return query, key, value

    def commit(self, cache, row: int) -> None:
        """Make the cache's conv window and delayed value those of fed token `row` (its stream: the tokens before)."""
        if self.stash is None:
            raise RuntimeError("commit_stream_state needs a cached forward with the stream index first")
        E_BCT, delayed_BTD = self.stash
        lookback = self.proj.conv_kernel_size
        layer = cache.layers[self.layer_idx]
        layer.conv_states[0] = E_BCT[..., row + 1:row + 1 + lookback].contiguous()
        layer.recurrent_states[0] = delayed_BTD[:, row].contiguous()
        self.stash = None


def commit_stream_state(model: nn.Module, cache, row: int) -> None:
    """After a cached stream forward: keep, in every ZAYA layer of `cache`, the conv window and delayed value of
    the fed token `row` (its clean-stream ancestors must be the cached prefix and fed rows 0..row), so that the next
    forward continues from exactly the committed sequence. Attention KV is cropped separately (`crop_attention`)."""
    for streams in model._ar2diff_zaya_streams:
        streams.commit(cache, row)


def crop_attention(cache, keep: int) -> None:
    """Drop every cached attention position from `keep` on; the conv and delayed-value states are left alone."""
    from transformers.cache_utils import DynamicLayer

    for layer in cache.layers:
        extra = DynamicLayer.get_seq_length(layer) - keep
        if extra > 0:
            DynamicLayer.crop(layer, -extra)


def install_zaya_adapter(model: nn.Module) -> int:
    """Attach the stream hooks to every ZAYA attention layer (idempotent). Returns how many layers were adapted."""
    from transformers.models.zaya.modeling_zaya import ZayaAttention

    if getattr(model, "_ar2diff_zaya_adapter", False):
        return 0
    streams = [_CCAStreams(module) for module in model.modules() if isinstance(module, ZayaAttention)]
    model._ar2diff_zaya_adapter = True
    model._ar2diff_zaya_streams = streams
    return len(streams)
