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
        self.prev_BT: torch.Tensor | None = None
        self.halo = None  # sequence parallelism: prev_BT then indexes [previous rank's halo | local tokens]
        self.qk_padded: torch.Tensor | None = None
        attn.register_forward_pre_hook(self._take_prev, with_kwargs=True)
        attn.register_forward_hook(self._drop_prev, always_call=True)
        self.proj.conv_qk_depthwise.register_forward_pre_hook(self._capture_conv_input)
        self.proj.conv_qk_grouped.register_forward_hook(self._stream_conv)
        self.proj.register_forward_hook(self._stream_value, with_kwargs=True)

    def _take_prev(self, module, args, kwargs):
        self.prev_BT = kwargs.get(PREV_KWARG)
        self.halo = kwargs.get(HALO_KWARG)
        if self.prev_BT is not None and kwargs.get("past_key_values") is not None:
            raise ValueError("the ZAYA stream adapter does not support a KV cache; decode calls must not pass "
                             f"{PREV_KWARG}")

    def _drop_prev(self, module, args, output):
        self.prev_BT = None
        self.halo = None
        self.qk_padded = None

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
        qk_BCT = self.qk_padded[..., lookback:]  # drop the model's own left zero-padding
        B, C, T = qk_BCT.shape
        win_BTW = _windows(self.prev_BT, lookback + 1)[:, -T:]
        x = _gather_tokens(self._extend(qk_BCT.transpose(1, 2)), win_BTW)  # (B, T, W, C)
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
        start_D = self.proj.v_proj_delayed(hidden_BTH.new_zeros(1, 1, hidden_BTH.shape[-1]))[0, 0]
        prev = self.prev_BT[:, -T:]
        delayed_BTD = self._extend(delayed_BTD)
        shifted = torch.where((prev >= 0)[..., None], delayed_BTD.gather(
            1, prev.clamp(min=0)[..., None].expand(-1, -1, delayed_BTD.shape[-1])), start_D)
        value_flat = value.reshape(B, T, -1)
        half = value_flat.shape[-1] - shifted.shape[-1]
        value = torch.cat([value_flat[..., :half], shifted], dim=-1).view_as(value)
        return query, key, value


def install_zaya_adapter(model: nn.Module) -> int:
    """Attach the stream hooks to every ZAYA attention layer (idempotent). Returns how many layers were adapted."""
    from transformers.models.zaya.modeling_zaya import ZayaAttention

    if getattr(model, "_ar2diff_zaya_adapter", False):
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, ZayaAttention):
            _CCAStreams(module)
            n += 1
    model._ar2diff_zaya_adapter = True
    return n
