"""objective.diff_target: the drafter trained toward the detached AR distribution of the same forward."""

import math
import sys
from pathlib import Path

import pytest
import torch

from ar2diff.objective import DiffTarget, TidarObjective, tidar_loss

sys.path.insert(0, str(Path(__file__).parent))
from tiny import MASK_ID, tiny_model  # noqa: E402


def _case():
    ids = torch.tensor([[0, 1, 2, 1]])
    docs = torch.tensor([[0, 0, 1, 1]])
    loss_mask = torch.tensor([[True, True, True, True]])
    draft_mask = torch.tensor([[True, True, True, True]])
    ar = torch.log(torch.tensor([[[.2, .5, .3], [.1, .1, .8], [.6, .3, .1], [.3, .3, .4]]]))
    diff = torch.log(torch.tensor([[[.7, .2, .1], [.25, .5, .25], [.1, .1, .8], [.4, .4, .2]]]))
    return ar, diff, ids, docs, loss_mask, draft_mask


def test_ar_and_mix_targets_equal_hand_computation():
    ar, diff, ids, docs, loss_mask, draft_mask = _case()
    p_ar, q = ar.exp()[0], diff.exp()[0]
    data_ce = [-math.log(q[i, ids[0, i]]) for i in range(4)]
    # position 1's teacher is clean position 0 (same document); positions 0 and 2 start a document: data target;
    # position 3's teacher is clean position 2.
    soft = {i: -(p_ar[i - 1] * q[i].log()).sum().item() for i in (1, 3)}
    for kind, lam in (("ar", 1.0), ("mix", 0.3)):
        terms = tidar_loss(ar, diff, ids, docs, loss_mask, draft_mask, diff_target=DiffTarget(kind, weight=0.3))
        expect = [data_ce[i] if i not in soft else (1 - lam) * data_ce[i] + lam * soft[i] for i in range(4)]
        assert terms.n_diff == 4
        assert terms.diff.item() == pytest.approx(sum(expect) / 4, rel=1e-6)
        assert terms.diff_data.item() == pytest.approx(sum(data_ce) / 4, rel=1e-6)
    data = tidar_loss(ar, diff, ids, docs, loss_mask, draft_mask)
    assert data.diff.item() == pytest.approx(sum(data_ce) / 4, rel=1e-6) == data.diff_data.item()


def test_temperature_sharpens_the_teacher():
    ar, diff, ids, docs, loss_mask, draft_mask = _case()
    hot = tidar_loss(ar, diff, ids, docs, loss_mask, draft_mask, diff_target=DiffTarget("ar", temperature=0.5))
    p = torch.softmax(ar[0, 0] / 0.5, -1)
    soft1 = -(p * diff[0, 1]).sum().item()
    p3 = torch.softmax(ar[0, 2] / 0.5, -1)
    soft3 = -(p3 * diff[0, 3]).sum().item()
    expect = (-diff[0, 0, 0].item() + soft1 - diff[0, 2, 2].item() + soft3) / 4
    assert hot.diff.item() == pytest.approx(expect, rel=1e-6)


def test_teacher_is_detached_and_sft_mask_respected():
    ar, diff, ids, docs, _, draft_mask = _case()
    ar = ar.clone().requires_grad_(True)
    loss_mask = torch.tensor([[False, True, False, False]])  # SFT: only position 1 counts
    terms = tidar_loss(ar, diff, ids, docs, loss_mask, draft_mask, alpha=0.0, diff_target=DiffTarget("ar"))
    assert terms.n_diff == 1
    assert terms.diff.item() == pytest.approx(-(ar.exp()[0, 0] * diff[0, 1]).sum().item(), rel=1e-6)
    terms.loss.backward()
    assert torch.equal(ar.grad, torch.zeros_like(ar))  # alpha=0: only the diffusion term, whose teacher is detached


def test_bad_target_named():
    with pytest.raises(ValueError, match="objective.diff_target"):
        DiffTarget("teacher")
    with pytest.raises(ValueError, match="diff_target_temperature"):
        DiffTarget("ar", temperature=0)


@pytest.mark.parametrize("kind", ["ar", "mix"])
def test_chunked_aligned_loss_equals_full_logits(kind):
    """objective.loss_chunk_tokens with an AR target: same loss terms and gradients as the full-logits path."""
    from ar2diff.model import TidarLM

    lm = tiny_model("llama", seed=4).train()
    ids = torch.randint(3, MASK_ID, (2, 19), generator=torch.Generator().manual_seed(1))
    docs = torch.tensor([[0] * 7 + [1] * 12, [0] * 19])
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    loss_mask[1, :5] = False
    target = DiffTarget(kind, weight=0.4, temperature=2.0)
    results = []
    for chunk in (None, 5):
        lm.zero_grad(set_to_none=True)
        out = TidarObjective(TidarLM(lm, MASK_ID, block_size=4), loss_chunk_size=chunk, diff_target=target)(
            ids, doc_ids=docs, loss_mask=loss_mask)
        out.loss.backward()
        results.append((out.terms, {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}))
    (full, g_full), (chunked, g_chunked) = results
    assert full.n_diff == chunked.n_diff == 33
    for key in ("loss", "ar", "diff", "diff_data"):
        torch.testing.assert_close(getattr(chunked, key), getattr(full, key), rtol=1e-6, atol=1e-6)
    assert full.diff.item() != pytest.approx(full.diff_data.item(), rel=1e-3)
    for name in g_full:
        torch.testing.assert_close(g_chunked[name], g_full[name], rtol=1e-4, atol=1e-6, msg=name)
