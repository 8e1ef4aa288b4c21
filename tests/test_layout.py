"""The TiDAR layout: ids, positions, stream predecessors."""

import pytest
import torch

from ar2diff.model import build_tidar_layout, positions_from_docs
from ar2diff.model.layout import sample_draft_mask

M = 99


def test_layout_of_a_packed_row():
    ids = torch.tensor([[10, 11, 12, 13, 14, 20, 21, 22]])
    docs = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
    lay = build_tidar_layout(ids, M, block_size=2, doc_ids_BS=docs)
    assert lay.input_ids_BL.tolist() == [[10, 11, 12, 13, 14, 20, 21, 22] + [M] * 8]
    assert lay.position_ids_BL.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2] * 2]
    # clean predecessors: the previous token of the same document; drafts: previous draft inside the block, the
    # clean token before the block at its first position, -1 at a document start
    assert lay.prev_BL.tolist() == [[-1, 0, 1, 2, 3, -1, 5, 6] + [-1, 8, 1, 10, 3, -1, 13, 6]]
    assert lay.meta.ctx.tolist() == [[1, 2, 3, 4, 5, 1, 2, 3] + [0, 0, 2, 2, 4, 0, 0, 2]]


def test_positions_restart_per_document():
    docs = torch.tensor([[0, 0, 1, 1, 1, 2, -1, -1]])
    assert positions_from_docs(docs).tolist() == [[0, 1, 0, 1, 2, 0, 0, 1]]


def test_random_mask_ratio_keeps_some_tokens():
    g = torch.Generator().manual_seed(0)
    mask = sample_draft_mask((4, 1000), 0.3, g)
    assert 0.25 < mask.float().mean() < 0.35
    ids = torch.arange(8)[None]
    lay = build_tidar_layout(ids, M, 4, draft_mask_BS=torch.tensor([[True, False] * 4]))
    assert lay.input_ids_BL[0, 8:].tolist() == [M, 1, M, 3, M, 5, M, 7]
    with pytest.raises(ValueError, match="mask_ratio"):
        sample_draft_mask((1, 4), 0.0)


def test_layout_rejects_document_ids_that_repeat_non_contiguously():
    from ar2diff.model.layout import causal_meta, check_contiguous_docs

    ids = torch.arange(6).view(1, 6)
    check_contiguous_docs(torch.tensor([[0, 0, 1, 1, 2, -1], [5, 5, 5, 7, 7, 7]]))
    leaky = torch.tensor([[0, 0, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="row 0: document id 0 appears in two separate segments"):
        build_tidar_layout(ids, mask_token_id=99, block_size=2, doc_ids_BS=leaky)
    with pytest.raises(ValueError, match="row 1: document id 3"):
        causal_meta(torch.tensor([[0, 0, 0, 1, 1, 1], [3, 4, 3, 5, 5, 5]]), torch.zeros(2, 6, dtype=torch.long))
