"""TidarLM against the unmodified transformers models: clean-stream parity, draft-stream reference, no leakage;
TidarObjective's router term; the adapter refuses a hybrid objective without a mask token."""

import pytest
import torch

from ar2diff.model import TidarLM
from ar2diff.objective import TidarObjective
from tiny import MASK_ID, TINY_CONFIGS, hf_mask_arg, tiny_model

ARCHS = sorted(TINY_CONFIGS)


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    return request.param, tiny_model(request.param, seed=1)


def test_clean_stream_equals_plain_ar_forward(arch_model):
    arch, lm = arch_model
    tidar = TidarLM(lm, MASK_ID, block_size=4)
    ids = torch.randint(3, MASK_ID, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = lm(input_ids=ids).logits
        out = tidar(ids)
        plain = TidarObjective(tidar, kind="ar").forward_ar(ids, return_logits=True)
    torch.testing.assert_close(out.ar_logits, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain.ar_logits, ref, rtol=1e-5, atol=1e-5)


def test_packed_documents_match_separate_forwards(arch_model):
    arch, lm = arch_model
    tidar = TidarLM(lm, MASK_ID, block_size=4)
    g = torch.Generator().manual_seed(1)
    lengths = [7, 9, 5]
    docs = [torch.randint(3, MASK_ID, (n,), generator=g) for n in lengths]
    ids = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        out = tidar(ids, doc_ids=doc_ids)
        start = 0
        for doc in docs:
            n = len(doc)
            ref = lm(input_ids=doc[None]).logits
            torch.testing.assert_close(out.ar_logits[:, start:start + n], ref, rtol=1e-5, atol=1e-5)
            alone = tidar(doc[None])
            torch.testing.assert_close(out.diff_logits[:, start:start + n], alone.diff_logits, rtol=1e-5, atol=1e-5)
            start += n


@pytest.mark.parametrize("block_size", [4, 5])
def test_draft_block_equals_prefix_plus_masked_block(arch_model, block_size):
    """Independent reference: the model's own forward on `clean prefix + [MASK]*len(block)` with a hand-built mask
    (causal prefix, bidirectional block). For ZAYA this uses the model's own convolution on that linear sequence, so
    it checks the stream adapter: a block's first mask must see the clean tokens before the block."""
    arch, lm = arch_model
    S = 14  # last block partial for both block sizes
    tidar = TidarLM(lm, MASK_ID, block_size=block_size)
    ids = torch.randint(3, MASK_ID, (1, S), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = tidar(ids)
        for start in range(0, S, block_size):
            n = min(block_size, S - start)
            virt = torch.cat([ids[:, :start], torch.full((1, n), MASK_ID)], dim=1)
            allowed = torch.ones(start + n, start + n, dtype=torch.bool).tril()
            allowed[start:, start:] = True
            ref = lm(input_ids=virt, attention_mask=hf_mask_arg(lm, allowed[None, None]),
                     position_ids=torch.arange(start + n)[None]).logits[:, start:]
            torch.testing.assert_close(out.diff_logits[:, start:start + n], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [4, 6, 16])
def test_no_leakage(arch_model, block_size):
    """Changing tokens at/after a block's first position never changes that block's or earlier blocks' diffusion
    logits, nor AR logits before the change; changing another document changes nothing in this one."""
    arch, lm = arch_model
    S = 21  # partial last block for every block size here
    tidar = TidarLM(lm, MASK_ID, block_size=block_size)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, MASK_ID, (1, S), generator=g)
    with torch.no_grad():
        base = tidar(ids)
        for start in range(0, S, block_size):
            for t in {start, min(start + block_size - 1, S - 1), S - 1}:
                changed = ids.clone()
                changed[0, t] = (changed[0, t] + 7 - 3) % (MASK_ID - 3) + 3
                out = tidar(changed)
                end = start + block_size  # blocks up to and including the one holding t (t >= start)
                t_block_end = (t // block_size + 1) * block_size
                keep = min(t - t % block_size, S)
                torch.testing.assert_close(out.diff_logits[:, :keep], base.diff_logits[:, :keep],
                                           rtol=0, atol=1e-5)
                torch.testing.assert_close(out.ar_logits[:, :t], base.ar_logits[:, :t], rtol=0, atol=1e-5)
                # sanity: the change is visible where it should be (AR logit at t, later blocks' drafts)
                assert not torch.allclose(out.ar_logits[:, t], base.ar_logits[:, t], atol=1e-4)
                if t_block_end < S:
                    assert not torch.allclose(out.diff_logits[:, t_block_end:], base.diff_logits[:, t_block_end:],
                                              atol=1e-4)
                del end

    # documents: doc 1 must not see anything of doc 0 and vice versa
    doc_ids = torch.tensor([[0] * 9 + [1] * (S - 9)])
    with torch.no_grad():
        base = tidar(ids, doc_ids=doc_ids)
        for t in (0, 4, 8):
            changed = ids.clone()
            changed[0, t] = (changed[0, t] + 5 - 3) % (MASK_ID - 3) + 3
            out = tidar(changed, doc_ids=doc_ids)
            torch.testing.assert_close(out.ar_logits[:, 9:], base.ar_logits[:, 9:], rtol=0, atol=1e-5)
            torch.testing.assert_close(out.diff_logits[:, 9:], base.diff_logits[:, 9:], rtol=0, atol=1e-5)
        changed = ids.clone()
        changed[0, 12] = (changed[0, 12] + 5 - 3) % (MASK_ID - 3) + 3
        out = tidar(changed, doc_ids=doc_ids)
        torch.testing.assert_close(out.ar_logits[:, :9], base.ar_logits[:, :9], rtol=0, atol=1e-5)
        torch.testing.assert_close(out.diff_logits[:, :9], base.diff_logits[:, :9], rtol=0, atol=1e-5)


def test_gradient_checkpointing_keeps_the_stream_adapter():
    """Activation-checkpoint recomputes must see the same stream index as the forward (ZAYA)."""
    lm = tiny_model("zaya", seed=4).train()
    tidar = TidarObjective(TidarLM(lm, MASK_ID, block_size=4))
    ids = torch.randint(3, MASK_ID, (2, 11), generator=torch.Generator().manual_seed(4))
    tidar(ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    lm.zero_grad(set_to_none=True)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tidar(ids).loss.backward()
    for n, p in lm.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_moe_balancing_loss_is_part_of_the_objective():
    lm = tiny_model("qwen3_moe", seed=5)
    tidar = TidarObjective(TidarLM(lm, MASK_ID, block_size=4), aux_coef=0.5)
    ids = torch.randint(3, MASK_ID, (1, 9), generator=torch.Generator().manual_seed(5))
    out = tidar(ids)
    terms = out.terms
    assert terms.aux > 0
    torch.testing.assert_close(out.loss.detach(), (terms.ar + terms.diff) / 2 + 0.5 * terms.aux)


def test_bad_inputs_are_named():
    lm = tiny_model("llama")
    with pytest.raises(ValueError, match="block_size=30 does not fit"):
        TidarLM(lm, MASK_ID, block_size=30)(torch.randint(3, 50, (1, 12)))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        TidarLM(lm, MASK_ID, block_size=4)(torch.randint(3, 50, (1, 600)))
    with pytest.raises(ValueError, match="tokenizer does not match"):
        TidarLM(lm, MASK_ID, block_size=4)(torch.full((1, 8), 500))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        TidarLM(lm, 1000, block_size=4)


def test_objective_needs_a_mask_token_and_the_adapter_has_no_loss():
    lm = tiny_model("llama")
    with pytest.raises(ValueError, match="mask token"):
        TidarObjective(TidarLM(lm, None, block_size=4))
    out = TidarLM(lm, MASK_ID, block_size=4)(torch.randint(3, 50, (1, 8)))
    assert not hasattr(out, "loss") and out.ar_logits.shape == out.diff_logits.shape == (1, 8, lm.config.vocab_size)
    objective = TidarObjective(TidarLM(lm, MASK_ID, block_size=4))
    assert [n for n, _ in objective.named_parameters()] == [f"lm.{n}" for n, _ in lm.named_parameters()]
