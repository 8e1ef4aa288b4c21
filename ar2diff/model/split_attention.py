"""SDPA for the TiDAR training layout without its empty quadrant: two calls instead of one over (2S)^2.

In the `[clean | draft]` training layout no clean query sees a draft key (`can_attend`): a quarter of the dense
mask is empty, yet a dense SDPA kernel computes it. When the mask of a forward is marked with its split S
(`mark_split`, done for the training layout only), the registered "sdpa" function runs the clean queries over the
clean keys (S x S) and the draft queries over every key (S x 2S): 3S^2 scores instead of 4S^2, the same softmax
over the same visible keys. Any unmarked mask (the AR forward, decoding, sequence parallelism, any other model in
the process) goes to transformers' own `sdpa_attention_forward` unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

SPLIT_ATTRIBUTE = "_ar2diff_tidar_split"


def mark_split(mask: torch.Tensor, S: int) -> torch.Tensor:
    """Tag a (B, 1, 2S, 2S) additive mask of the training layout with its split, for `split_sdpa_forward`."""
    setattr(mask, SPLIT_ATTRIBUTE, S)
    return mask


def split_sdpa_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention-function signature; query/key/value are (B, H, L, D), the output (B, L, H, D)."""
    S = getattr(attention_mask, SPLIT_ATTRIBUTE, None)
    if S is None or query.shape[2] != 2 * S or key.shape[2] != 2 * S:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    clean, _ = sdpa_attention_forward(module, query[:, :, :S], key[:, :, :S], value[:, :, :S],
                                      attention_mask[:, :, :S, :S], **kwargs)
    draft, _ = sdpa_attention_forward(module, query[:, :, S:], key, value, attention_mask[:, :, S:], **kwargs)
    return torch.cat([clean, draft], dim=1), None


AttentionInterface.register("sdpa", split_sdpa_forward)
