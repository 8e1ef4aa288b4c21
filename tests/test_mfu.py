"""Mask densities from key intervals equal the dense mask's counts; MFU's attention term scales with them."""

import pytest
import torch
from transformers import LlamaConfig

from ar2diff.model import block_mask, build_tidar_layout, dense_mask
from ar2diff.model.layout import causal_meta
from ar2diff.trainer.engine import flops_per_token
from ar2diff.trainer.mfu import DensityWindow, batch_meta, mask_density


def dense_counts(allowed_QK: torch.Tensor, tile: int) -> tuple[int, int]:
    """(allowed pairs, pairs inside tiles holding any allowed pair), counted on the dense mask."""
    Q, K = allowed_QK.shape
    visited = 0
    for i in range(0, Q, tile):
        for j in range(0, K, tile):
            block = allowed_QK[i:i + tile, j:j + tile]
            visited += block.numel() if bool(block.any()) else 0
    return int(allowed_QK.sum()), visited


@pytest.mark.parametrize("tile", [32, 64])
def test_densities_equal_counts_on_the_dense_mask(tile):
    S = 150
    docs = torch.tensor([[0] * 40 + [1] * 90 + [-1] * 20, [0] * 150])
    layout = build_tidar_layout(torch.zeros(2, S, dtype=torch.long), 1, 8, doc_ids_BS=docs)
    density = mask_density(layout.meta, tile=tile)
    dense = dense_mask(layout.meta)[:, 0]
    counts = [dense_counts(dense[b], tile) for b in range(2)]
    assert density.allowed == sum(c[0] for c in counts)
    assert density.computed == sum(c[1] for c in counts)
    assert density.total == 2 * (2 * S) ** 2
    # the computed pairs are exactly the tiles the flex BlockMask lists
    bm = block_mask(layout.meta, block_size=tile)
    assert int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()) * tile * tile >= density.computed


def test_tidar_element_density_has_the_closed_form_and_is_about_a_quarter():
    S, b = 4096, 16
    meta = build_tidar_layout(torch.zeros(1, S, dtype=torch.long), 1, b).meta
    n = S // b
    allowed = S * (S + 1) // 2 + b * b * n * (n - 1) // 2 + S * b  # clean causal + drafts->earlier blocks + own
    density = mask_density(meta)
    assert density.allowed == allowed
    assert 0.25 < density.element < 0.26
    assert density.element < density.compute < 0.3
    assert mask_density(meta, tile=None).compute == 1.0


def test_mfu_attention_term_uses_the_compute_density():
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         vocab_size=100)
    full = flops_per_token(config, 1024, 1000)
    assert flops_per_token(config, 1024 * 0.25, 1000) - 6 * 1000 == pytest.approx((full - 6 * 1000) * 0.25)


def test_density_window_averages_micro_batches_and_resets():
    docs = torch.tensor([[0] * 64])
    pos = torch.arange(64)[None]
    window = DensityWindow("tidar", 8, "flex_attention")
    window.add(docs, pos)
    window.add(torch.tensor([[0] * 32 + [1] * 32]), torch.cat([torch.arange(32), torch.arange(32)])[None])
    first = window.take()
    one = mask_density(batch_meta("tidar", 8, docs, pos))
    assert first["mask_density"] < one.element  # two documents allow fewer pairs than one
    assert window.take() == {"mask_density": 0.0, "attn_compute_density": 0.0}
    ar = DensityWindow("ar", 8, "sdpa")
    ar.add(docs, pos)
    assert ar.take() == {"mask_density": mask_density(causal_meta(docs, pos)).element, "attn_compute_density": 1.0}
