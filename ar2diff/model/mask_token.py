"""Add the `[MASK]` token the diffusion stream is written in, without disturbing any existing token."""

from __future__ import annotations

import torch
from torch import nn

MASK_TOKEN = "[MASK]"


def add_mask_token(model: nn.Module, tokenizer, block_size: int, mask_token: str = MASK_TOKEN) -> int:
    """Register a mask token in tokenizer and model; return its id.

    The tokenizer gets `mask_token` set (reusing one it already has). If the id falls outside the model's embedding
    table the table grows by exactly the missing rows (tied heads stay tied, untied heads grow too); existing rows
    are untouched. The mask row of the input embedding is set to the mean embedding, a neutral starting point
    for a token the model has never seen; an untied output row gets the mean output row (and mean bias), so the
    mask token starts with an average logit. The id and block size are recorded in the model config
    (`mask_token_id`, `tidar_block_size`), which the export writes to config.json.
    """
    embed = model.get_input_embeddings()
    n_vocab = embed.weight.shape[0]
    if len(tokenizer) > n_vocab:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model embeds only {n_vocab}: the tokenizer does not "
            "belong to this model (check model.path / data.tokenizer_path)")
    if tokenizer.mask_token is None:
        tokenizer.add_special_tokens({"mask_token": mask_token})
    mask_id = tokenizer.mask_token_id
    fresh = getattr(model.config, "mask_token_id", None) != mask_id
    if mask_id >= n_vocab:
        model.resize_token_embeddings(mask_id + 1, mean_resizing=False)
    if fresh:
        _init_mask_rows(model, mask_id, n_rows=min(n_vocab, mask_id))
    model.config.mask_token_id = mask_id
    model.config.tidar_block_size = block_size
    return mask_id


@torch.no_grad()
def _init_mask_rows(model: nn.Module, mask_id: int, n_rows: int) -> None:
    """Set the mask row to the mean of the first `n_rows` (pre-existing) rows, input and untied output."""
    embed = model.get_input_embeddings().weight
    embed[mask_id] = embed[:n_rows].float().mean(0).to(embed.dtype)
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != embed.data_ptr():
        head.weight[mask_id] = head.weight[:n_rows].float().mean(0).to(head.weight.dtype)
        if getattr(head, "bias", None) is not None:
            head.bias[mask_id] = head.bias[:n_rows].float().mean().to(head.bias.dtype)
