"""Teacher-forced drafter-verifier agreement per block offset."""

import sys
from pathlib import Path

import pytest
import torch

from ar2diff.decode.agreement import agreement_curve, offset_statistics

sys.path.insert(0, str(Path(__file__).parent))
from tiny import MASK_ID, progressions, tiny_model  # noqa: E402


def test_offset_statistics_by_hand():
    # one row, two documents: [a a a | b b]; block 2; position ids restart per document
    ids = torch.tensor([[0, 1, 2, 1, 0]])
    docs = torch.tensor([[0, 0, 0, 1, 1]])
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    ar = torch.log(torch.tensor([[[.6, .3, .1], [.1, .2, .7], [.3, .3, .4], [.5, .25, .25], [.2, .2, .6]]]))
    diff = torch.log(torch.tensor([[[.3, .3, .4], [.2, .5, .3], [.1, .1, .8], [.4, .4, .2], [.7, .2, .1]]]))
    counted = torch.ones(1, 5, dtype=torch.bool)
    s = offset_statistics(ar, diff, ids, docs, pos, counted, block_size=2)
    # positions with a teacher: 1 (offset 1, teacher 0), 2 (offset 0, teacher 1), 4 (offset 1, teacher 3)
    assert s["count"].tolist() == [1, 2]
    # pos 1: argmax AR@0 = 0, diff = 1 -> no; pos 4: AR@3 = 0, diff = 0 -> yes; pos 2: AR@1 = 2, diff = 2 -> yes
    assert s["argmax_agree"].tolist() == [1, 1]
    min_sum = lambda p, q: float(torch.minimum(p, q).sum())  # noqa: E731
    P, Q = ar.exp()[0], diff.exp()[0]
    assert s["expected_accept"][0].item() == pytest.approx(min_sum(P[1], Q[2]))
    assert s["expected_accept"][1].item() == pytest.approx(min_sum(P[0], Q[1]) + min_sum(P[3], Q[4]))
    # data hits: pos 1 target 1 (diff argmax 1: hit), pos 2 target 2 (hit), pos 4 target 0 (hit)
    assert s["data_hit"].tolist() == [1, 2]
    # per row, over the drafted offsets only (offset >= 1): positions 1 and 4
    assert s["rows"]["count"].tolist() == [2] and s["rows"]["argmax_agree"].tolist() == [1]
    assert s["rows"]["expected_accept"][0].item() == pytest.approx(min_sum(P[0], Q[1]) + min_sum(P[3], Q[4]))


def test_curve_on_a_model_counts_every_drafted_position_with_a_predecessor():
    from ar2diff.model import TidarLM
    from ar2diff.objective import TidarObjective

    model = TidarObjective(TidarLM(tiny_model("llama", seed=1), MASK_ID, block_size=4)).eval()
    ids = progressions(torch.Generator().manual_seed(0), 3, 12)
    docs = torch.tensor([[0] * 12, [0] * 5 + [1] * 7, [0] * 12])
    pos = torch.cat([torch.arange(12)[None], torch.cat([torch.arange(5), torch.arange(7)])[None],
                     torch.arange(12)[None]])
    rows = {"input_ids": ids, "doc_ids": docs, "position_ids": pos, "loss_mask": torch.ones_like(ids, dtype=torch.bool)}
    curve = agreement_curve(model, rows, micro_batch=2)
    assert sum(curve["positions"]) == 3 * 12 - 4  # every position but the four document starts
    assert curve["positions"][0] == 6  # offset 0 with a predecessor: pos 4 and 8 in rows 0, 2; pos 4 of both docs in row 1
    for key in ("argmax_agree", "expected_accept", "data_hit"):
        assert len(curve[key]) == 4 and all(0 <= v <= 1 for v in curve[key])
    again = agreement_curve(model, rows, micro_batch=3)  # micro batching does not change the numbers
    assert again["expected_accept"] == pytest.approx(curve["expected_accept"], rel=1e-5)
    assert curve["rows"] == 3
    for key in ("argmax_agree", "expected_accept", "data_hit"):  # a bootstrap interval over rows around each mean
        low, high = curve["mean_over_drafts_interval"][key]
        assert low <= curve["mean_over_drafts"][key] + 1e-9 and curve["mean_over_drafts"][key] <= high + 1e-9
        assert again["mean_over_drafts_interval"][key] == pytest.approx([low, high], rel=1e-5)
    # a drafter identical to the verifier agrees perfectly: feed the same logits to both streams
    out = model(ids, docs, pos, return_logits=True)
    shifted = torch.cat([out.ar_logits[:, :1], out.ar_logits[:, :-1]], dim=1)
    s = offset_statistics(out.ar_logits, shifted, ids, docs, pos, torch.ones_like(ids, dtype=torch.bool), 4)
    assert torch.allclose(s["argmax_agree"], s["count"]) and torch.allclose(s["expected_accept"], s["count"])
