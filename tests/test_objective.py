"""The hybrid loss against a hand computation."""

import math

import pytest
import torch

from ar2diff.objective import tidar_loss


def test_loss_equals_hand_computation_with_masks_and_documents():
    V = 3
    ids = torch.tensor([[0, 1, 2, 1]])
    docs = torch.tensor([[0, 0, 1, 1]])
    loss_mask = torch.tensor([[True, True, True, False]])
    draft_mask = torch.tensor([[True, True, False, True]])
    ar_logits = torch.log(torch.tensor([[[.2, .5, .3], [.1, .1, .8], [.6, .3, .1], [.3, .3, .4]]]))
    diff_logits = torch.log(torch.tensor([[[.7, .2, .1], [.25, .5, .25], [.1, .1, .8], [.4, .4, .2]]]))
    alpha = 2.0
    terms = tidar_loss(ar_logits, diff_logits, ids, docs, loss_mask, draft_mask, alpha=alpha)
    # AR: pos 0 -> token 1 (p=.5); pos 1 -> token 2 crosses a document: excluded; pos 2 -> token 1 not in loss mask
    l_ar = -math.log(.5)
    # diffusion: pos 0 (p=.7), pos 1 (p=.5); pos 2 not masked; pos 3 not in loss mask
    l_diff = (-math.log(.7) - math.log(.5)) / 2
    assert terms.n_ar == 1 and terms.n_diff == 2
    assert terms.ar.item() == pytest.approx(l_ar, rel=1e-6)
    assert terms.diff.item() == pytest.approx(l_diff, rel=1e-6)
    assert terms.loss.item() == pytest.approx((alpha * l_ar + l_diff) / (1 + alpha), rel=1e-6)


def test_empty_terms_are_zero_not_nan_and_gradients_flow():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    ids = torch.tensor([[1, 2, 3]])
    terms = tidar_loss(logits, logits, ids, torch.zeros_like(ids), torch.zeros(1, 3, dtype=torch.bool),
                       torch.ones(1, 3, dtype=torch.bool))
    assert terms.loss.item() == 0.0 and terms.n_ar == 0
    terms.loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_negative_alpha_rejected():
    x = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="objective.alpha"):
        tidar_loss(x, x, torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
                   torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool), alpha=-1)


def test_chunked_loss_equals_full_logits_loss_and_gradients():
    """objective.loss_chunk_tokens: the head runs per chunk under checkpointing; same loss, same gradients."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import MASK_ID, tiny_model

    from ar2diff.model import TidarLM
    from ar2diff.objective import TidarObjective

    for arch in ("llama", "zaya"):
        lm = tiny_model(arch, seed=3).train()
        ids = torch.randint(3, MASK_ID, (2, 19), generator=torch.Generator().manual_seed(0))
        docs = torch.tensor([[0] * 7 + [1] * 12, [0] * 19])
        results = []
        for chunk in (None, 5):  # 5 divides neither the AR (35) nor the diffusion (38) token count
            lm.zero_grad(set_to_none=True)
            objective = TidarObjective(TidarLM(lm, MASK_ID, block_size=4), alpha=2.0, loss_chunk_size=chunk)
            out = objective(ids, doc_ids=docs)
            out.loss.backward()
            results.append((out.terms, {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}))
        (full, g_full), (chunked, g_chunked) = results
        assert (full.n_ar, full.n_diff) == (chunked.n_ar, chunked.n_diff) == (35, 38)
        torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(chunked.ar, full.ar, rtol=1e-6, atol=1e-6)
        assert g_full.keys() == g_chunked.keys()
        for name in g_full:
            torch.testing.assert_close(g_chunked[name], g_full[name], rtol=1e-4, atol=1e-6, msg=f"{arch} {name}")
