"""The run-structure BlockMask equals torch's dense-built one field by field; the dense mask refuses to not fit."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from ar2diff.decode.step_layout import build_step_layout, slice_meta
from ar2diff.model import block_mask, build_tidar_layout, dense_mask, mask_mod
from ar2diff.model.attention import DenseMaskTooLargeError, attention_mask_for
from ar2diff.model.flex_mask import NotRunFormError, build_block_mask, tidar_block_mask
from ar2diff.model.layout import TokenMeta

FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
          "full_q_num_blocks", "full_q_indices")


def assert_same_block_mask(ours, torchs):
    assert ours.seq_lengths == torchs.seq_lengths and ours.BLOCK_SIZE == torchs.BLOCK_SIZE
    for name in FIELDS:
        assert torch.equal(getattr(ours, name), getattr(torchs, name)), name


def random_packing(g: torch.Generator, B: int, S: int) -> torch.Tensor:
    """Rows of packed documents of random lengths, some ending in padding (doc -1)."""
    rows = []
    for _ in range(B):
        row, doc = [], 0
        while len(row) < S:
            row += [doc] * int(torch.randint(1, S + 1, (1,), generator=g))
            doc += 1
        pad = int(torch.randint(0, S // 3 + 1, (1,), generator=g))
        rows.append(row[:S - pad] + [-1] * pad)
    return torch.tensor(rows)


@pytest.mark.parametrize("seed", range(8))
def test_block_mask_equals_torchs_dense_builder_on_random_packings(seed):
    g = torch.Generator().manual_seed(seed)
    S = int(torch.randint(70, 330, (1,), generator=g))
    block_size = int(torch.randint(4, 65, (1,), generator=g))
    docs = random_packing(g, 2, S)
    layout = build_tidar_layout(torch.zeros(2, S, dtype=torch.long), 1, block_size, doc_ids_BS=docs)
    for tile in (64, 128):
        reference = create_block_mask(mask_mod(layout.meta, layout.meta), 2, None, 2 * S, 2 * S, BLOCK_SIZE=tile)
        assert_same_block_mask(block_mask(layout.meta, block_size=tile), reference)


def test_block_mask_lists_every_allowed_pair_and_marks_only_all_allowed_tiles_full():
    S, tile = 200, 64
    docs = torch.tensor([[0] * 61 + [1] * 100 + [-1] * 39])
    layout = build_tidar_layout(torch.zeros(1, S, dtype=torch.long), 1, 16, doc_ids_BS=docs)
    dense = dense_mask(layout.meta)[0, 0]
    bm = block_mask(layout.meta, block_size=tile)
    listed, full = bm.to_dense()[0, 0].bool(), torch.zeros_like(bm.to_dense()[0, 0]).bool()
    for i in range(full.shape[0]):
        for j in bm.full_kv_indices[0, 0, i, :bm.full_kv_num_blocks[0, 0, i]]:
            full[i, j] = True
    for i in range(listed.shape[0]):
        for j in range(listed.shape[1]):
            pairs = dense[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile]
            assert bool(pairs.any()) == bool(listed[i, j])
            assert bool(full[i, j]) == (pairs.numel() == tile * tile and bool(pairs.all()))
    q = torch.arange(2 * S)[:, None].expand(2 * S, 2 * S)
    assert torch.equal(bm.mask_mod(torch.tensor(0), torch.tensor(0), q, q.T), dense)


def test_decode_step_layouts_with_a_cached_prefix():
    layout = build_step_layout(list(range(3, 140)), [5, 6, 7], [0, 2, 3], 16, 1)
    for start in (0, 136):
        q_meta = slice_meta(layout.meta, start)
        Q, K = q_meta.doc.shape[1], layout.meta.doc.shape[1]
        reference = create_block_mask(mask_mod(q_meta, layout.meta), 1, None, Q, K, BLOCK_SIZE=64)
        assert_same_block_mask(block_mask(q_meta, layout.meta, block_size=64), reference)


def split_doc_records(L: int) -> TokenMeta:
    """A causal row whose document 0 is interrupted by document 1: not in run form."""
    doc = torch.tensor([[0] * (L // 3) + [1] * (L // 3) + [0] * (L - 2 * (L // 3))])
    pos = torch.arange(L)[None]
    return TokenMeta(doc=doc, pos=pos, is_draft=torch.zeros_like(doc, dtype=torch.bool),
                     block=torch.full_like(doc, -1), ctx=pos + 1)


def test_records_not_in_run_form_fall_back_when_small_and_are_refused_when_large(monkeypatch):
    meta = split_doc_records(150)
    with pytest.raises(NotRunFormError, match="document"):
        tidar_block_mask(meta, meta, mask_mod(meta, meta), 64)
    reference = create_block_mask(mask_mod(meta, meta), 1, None, 150, 150, BLOCK_SIZE=64)
    assert_same_block_mask(build_block_mask(meta, meta, mask_mod(meta, meta), 64), reference)
    monkeypatch.setattr("ar2diff.model.flex_mask.DENSE_FALLBACK_PAIRS", 100)
    with pytest.raises(NotRunFormError, match="too many"):
        build_block_mask(meta, meta, mask_mod(meta, meta), 64)


def test_a_dense_mask_that_cannot_fit_names_flex(monkeypatch):
    layout = build_tidar_layout(torch.zeros(1, 64, dtype=torch.long), 1, 16)
    # 5 bytes a pair for the boolean predicate + 4 for the fp32 additive mask
    monkeypatch.setattr("ar2diff.model.attention.free_memory_bytes", lambda device: 128 * 128 * 8)
    with pytest.raises(DenseMaskTooLargeError, match="model.attn_implementation=flex_attention"):
        attention_mask_for("sdpa", layout.meta)
    monkeypatch.setattr("ar2diff.model.attention.free_memory_bytes", lambda device: 128 * 128 * 9)
    assert attention_mask_for("sdpa", layout.meta).shape == (1, 1, 128, 128)
