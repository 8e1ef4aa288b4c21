"""The TiDAR decoder: greedy == AR greedy == transformers generate on every architecture, the step layout against an
independent reference, KV cache == full recompute, the drafting rule, logit mixing, and the sampled output
distribution against exact AR probabilities."""

import math
from functools import lru_cache

import pytest
import torch

from ar2diff.decode.ar import DecodeConfig, decode_ar, summarize
from ar2diff.decode.step_layout import build_step_layout
from ar2diff.decode.tidar import TidarConfig, decode_tidar, step_forward
from ar2diff.model import TidarLM, build_model
from ar2diff.objective import TidarObjective
from tiny import (MASK_ID, TINY_CONFIGS, chi_square, chi_square_critical, hf_mask_arg, make_prompts, progressions,
                  randomize, tiny_model)

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = sorted(TINY_CONFIGS)
TRAIN_BLOCK = 4


@lru_cache(maxsize=None)
def trained(arch: str) -> TidarLM:
    """A tiny model trained 80 steps on the TiDAR objective: its drafts are accepted often but not always, so the
    tests below exercise acceptance, rejection and cache cropping, not just rejected drafts."""
    torch.set_num_threads(1)
    lm = tiny_model(arch).train()
    model = TidarLM(lm, MASK_ID, block_size=TRAIN_BLOCK)
    objective = TidarObjective(model)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        loss = objective(progressions(g, 16, 24)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def expected_schedule(accepted, block_size, levels, max_new_tokens):
    """(drafts, templates) per step under the documented rule, from the accepted counts alone (independent of the
    decoder's helpers): the template of the closest drafted level l <= a supplies B - 1 - (a - l) drafts."""
    drafts, templates, generated = [0], [], 0
    for a in accepted:
        k = drafts[-1]
        remaining = max_new_tokens - generated
        if remaining <= 1:
            drafted = []
        elif levels == "all":
            drafted = list(range(k + 1))
        else:
            drafted = [level for level in levels if level <= k] or [0]
        templates.append(len(drafted))
        generated += a + 1
        below = [level for level in drafted if level <= a]
        drafts.append(0 if not below else min(block_size - 1 - (a - max(below)), max_new_tokens - generated - 1))
    return drafts[:-1], templates


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_ar_greedy_and_generate(arch):
    model = trained(arch)
    prompts = make_prompts()
    n = 20
    ar = decode_ar(model, prompts, DecodeConfig(max_new_tokens=n))
    for prompt, r in zip(prompts, ar):
        ids = torch.tensor([prompt])
        ref = model.lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert r.token_ids == ref
    accepted_any = 0
    for block_size, levels in [(4, "all"), (4, (1,)), (6, (0, 2, 4)), (16, (4, 7, 10))]:
        cfg = TidarConfig(max_new_tokens=n, block_size=block_size, levels=levels)
        for a, t in zip(ar, decode_tidar(model, prompts, cfg)):
            assert t.token_ids == a.token_ids, (block_size, levels)
            assert t.forwards == len(t.accepted) == len(t.drafts)
            assert all(0 <= acc <= k for acc, k in zip(t.accepted, t.drafts))
            assert (t.drafts, t.templates) == expected_schedule(t.accepted, block_size, levels, n)
            assert sum(acc + 1 for acc in t.accepted) >= n > sum(acc + 1 for acc in t.accepted[:-1])
            accepted_any += sum(t.accepted)
    assert accepted_any > 10  # the drafts were really accepted, not just rejected


def test_greedy_stops_at_eos_like_ar():
    model = trained("llama")
    prompts = make_prompts()
    free = decode_ar(model, prompts, DecodeConfig(max_new_tokens=20))
    eos = free[0].token_ids[7]
    ar = decode_ar(model, prompts, DecodeConfig(max_new_tokens=20, eos_token_id=eos))
    tidar = decode_tidar(model, prompts, TidarConfig(max_new_tokens=20, eos_token_id=eos))
    assert [r.token_ids for r in tidar] == [r.token_ids for r in ar]
    assert [r.stop for r in tidar] == [r.stop for r in ar]
    assert tidar[0].stop == "eos" and tidar[0].token_ids[-1] == eos


@pytest.mark.parametrize("arch", ARCHS)
def test_step_logits_match_an_independent_reference(arch):
    """Each row of a step against the unmodified model on the sequence it stands for: the clean rows against a
    plain causal forward of committed + drafts; the template of level l against `committed + d_1..d_l + [MASK]*B`
    with a bidirectional last block (for ZAYA: the model's own convolution on that linear sequence)."""
    model = TidarLM(tiny_model(arch, seed=1), MASK_ID, block_size=4)
    lm, B = model.lm, 4
    g = torch.Generator().manual_seed(6)
    committed = torch.randint(3, MASK_ID, (7,), generator=g).tolist()
    drafts = torch.randint(3, MASK_ID, (3,), generator=g).tolist()
    n, k = len(committed), len(drafts)
    layout = build_step_layout(committed, drafts, (0, 1, 2, 3), B, MASK_ID)
    with torch.no_grad():
        rows = {"recompute": step_forward(model, layout, None, 0)[0]}
        if arch != "zaya":
            cache = lm(input_ids=torch.tensor([committed[:-1]]), use_cache=True).past_key_values
            rows["cache"] = step_forward(model, layout, cache, n - 1)[0]
            assert cache.get_seq_length() == layout.length
        clean_ref = lm(input_ids=torch.tensor([committed + drafts])).logits[0, n - 1:]
        for name, logits_RV in rows.items():
            assert logits_RV.shape[0] == k + 1 + 4 * B
            torch.testing.assert_close(logits_RV[:k + 1], clean_ref, rtol=1e-5, atol=1e-5, msg=name)
            for level in range(k + 1):
                virt = committed + drafts[:level] + [MASK_ID] * B
                L = len(virt)
                allowed = torch.ones(L, L, dtype=torch.bool).tril()
                allowed[L - B:, L - B:] = True
                ref = lm(input_ids=torch.tensor([virt]), attention_mask=hf_mask_arg(lm, allowed[None, None]),
                         position_ids=torch.arange(L)[None]).logits[0, L - B:]
                start = layout.templates[level] - layout.first
                torch.testing.assert_close(logits_RV[start:start + B], ref, rtol=1e-5, atol=1e-5,
                                           msg=f"{name} level {level}")


@pytest.mark.parametrize("levels", ["all", (1, 2)])
def test_each_draft_is_the_drafter_guess_for_its_own_position(levels, monkeypatch):
    """Greedy drafts of step i+1 must be the argmax of the drafter conditioned on committed + d_1..d_l (l the level
    used), read at the very positions the drafts occupy: checked against the unmodified model on
    `committed + d_1..d_l + [MASK]*B` with a bidirectional last block."""
    import ar2diff.decode.tidar as tidar_module

    model, B = trained("llama"), TRAIN_BLOCK
    calls = []

    def recording(committed, drafts, drafted, *args, **kwargs):
        calls.append((list(committed), list(drafts), tuple(drafted)))
        return build_step_layout(committed, drafts, drafted, *args, **kwargs)

    monkeypatch.setattr(tidar_module, "build_step_layout", recording)
    result = decode_tidar(model, make_prompts()[1:2], TidarConfig(max_new_tokens=20, levels=levels))[0]
    checked = 0
    for (seq, drafts, drafted), (next_seq, next_drafts, _), a in zip(calls, calls[1:], result.accepted):
        assert next_seq[:len(seq) + a] == seq + drafts[:a] and len(next_seq) == len(seq) + a + 1
        if not next_drafts:
            continue
        level = max(lv for lv in drafted if lv <= a)
        virt = seq + drafts[:level] + [MASK_ID] * B
        L = len(virt)
        allowed = torch.ones(L, L, dtype=torch.bool).tril()
        allowed[L - B:, L - B:] = True
        with torch.no_grad():
            logits = model.lm(input_ids=torch.tensor([virt]), attention_mask=allowed[None, None],
                              position_ids=torch.arange(L)[None]).logits[0]
        positions = range(len(next_seq), len(next_seq) + len(next_drafts))  # where the drafts will sit
        assert next_drafts == [int(logits[p].argmax()) for p in positions]
        checked += 1
    assert checked >= 3 and sum(result.accepted) > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_gives_the_logits_of_a_full_recompute(arch):
    model = trained(arch)
    for levels in ("all", (2,)):
        cfg = dict(max_new_tokens=16, levels=levels)
        cached = decode_tidar(model, make_prompts(), TidarConfig(**cfg), keep_logits=True)
        full = decode_tidar(model, make_prompts(), TidarConfig(**cfg, use_cache=False), keep_logits=True)
        for a, b in zip(cached, full):
            assert (a.token_ids, a.accepted, a.drafts) == (b.token_ids, b.accepted, b.drafts)
            assert len(a.step_logits) == a.forwards
            for step, (la, lb) in enumerate(zip(a.step_logits, b.step_logits)):
                assert la.shape == lb.shape
                torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4, msg=f"step {step}")
        assert sum(sum(r.accepted) for r in cached) > 0


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, seed=2),
                                      dict(temperature=1.0, sampler="mixing", mix_weight=0.5, seed=1)],
                         ids=["greedy", "sampled", "mixing"])
def test_zaya_stream_cache_equals_recompute_at_every_step(sampling):
    """ZAYA's cache (attention KV + CCA conv window + delayed value, committed after verification) gives the
    recompute path's tokens and, at every step, its logits to 1e-5: greedy and sampled (with rejections), every
    level and sparse levels, prompts shorter than, equal to and longer than the conv look-back."""
    model = trained("zaya")
    lookback = model.lm.model.layers[0].self_attn.qkv_proj.conv_kernel_size
    g = torch.Generator().manual_seed(11)
    prompts = [[7], [5, 9][:lookback], progressions(g, 1, 9)[0].tolist(), torch.randint(3, MASK_ID, (13,),
                                                                                         generator=g).tolist()]
    assert min(map(len, prompts)) < lookback < max(map(len, prompts))
    rejected = 0
    for levels in ("all", (0, 2)):
        cfg = dict(max_new_tokens=20, levels=levels, **sampling)
        cached = decode_tidar(model, prompts, TidarConfig(**cfg), keep_logits=True)
        full = decode_tidar(model, prompts, TidarConfig(**cfg, use_cache=False), keep_logits=True)
        for a, b in zip(cached, full):
            assert (a.token_ids, a.accepted, a.drafts, a.templates) == (b.token_ids, b.accepted, b.drafts,
                                                                        b.templates)
            for step, (la, lb) in enumerate(zip(a.step_logits, b.step_logits)):
                torch.testing.assert_close(la, lb, rtol=0, atol=1e-5, msg=f"step {step}")
            rejected += sum(k - acc for k, acc in zip(a.drafts, a.accepted))
        assert sum(sum(r.accepted) for r in cached) > 0
    assert rejected > 0  # drafts were rejected: their state must have left no trace


def test_zaya_cached_step_feeds_only_the_new_tokens():
    """After the first step the cached forward sees t_last, the drafts and the templates only."""
    model = trained("zaya")
    fed = []
    handle = model.lm.model.embed_tokens.register_forward_hook(lambda m, a, out: fed.append(a[0].shape[1]))
    try:
        (r,) = decode_tidar(model, [list(range(3, 40))], TidarConfig(max_new_tokens=12))
    finally:
        handle.remove()
    assert fed[0] >= 37
    assert all(n == 1 + k + t * TRAIN_BLOCK for n, k, t in zip(fed[1:], r.drafts[1:], r.templates[1:]))


def test_sampled_decoding_is_seeded_and_mixing_zero_is_lossless():
    model = trained("llama")
    prompts = make_prompts()
    base = dict(max_new_tokens=16, temperature=1.0, levels=(0, 2))
    lossless = decode_tidar(model, prompts, TidarConfig(**base, seed=3))
    again = decode_tidar(model, prompts, TidarConfig(**base, seed=3))
    mixing0 = decode_tidar(model, prompts, TidarConfig(**base, seed=3, sampler="mixing", mix_weight=0.0))
    other = decode_tidar(model, prompts, TidarConfig(**base, seed=4))
    key = [(r.token_ids, r.accepted, r.drafts) for r in lossless]
    assert key == [(r.token_ids, r.accepted, r.drafts) for r in again]
    assert key == [(r.token_ids, r.accepted, r.drafts) for r in mixing0]
    assert [r.token_ids for r in other] != [r.token_ids for r in lossless]


def test_mixing_weight_trades_exactness_for_acceptance():
    """Tokens per forward grows with the mixing weight (mean over prompts and seeds, greedy and sampled); at w = 1
    the verifier is the drafter itself, so every draft is accepted."""
    model = trained("llama")
    prompts = make_prompts()
    n = 24
    for temperature in (0.0, 1.0):
        tpf = []
        for w in (0.0, 0.5, 1.0):
            results = [r for seed in range(3) for r in decode_tidar(
                model, prompts, TidarConfig(max_new_tokens=n, temperature=temperature, sampler="mixing",
                                            mix_weight=w, seed=seed))]
            tpf.append(summarize(results)["tokens_per_forward"])
        assert tpf[0] <= tpf[1] + 0.05 and tpf[1] <= tpf[2] + 0.05, (temperature, tpf)
        assert tpf[2] > tpf[0] + 1
        assert all(r.accepted == r.drafts for r in results)  # w = 1: all accepted
        # block 4: one token from the first forward, then 3 drafts + 1 per forward
        assert all(r.forwards == 1 + math.ceil((n - 1) / TRAIN_BLOCK) for r in results)


def test_sampled_lossless_has_the_ar_distribution_of_the_first_two_tokens():
    """Temperature 1, vocabulary 6: token 1 comes from p(. | prompt), token 2 from verifying the drafter's draft
    against p(. | prompt, t1). Their joint frequency must match the exactly enumerated AR probabilities; the
    accept-every-draft distribution p(t1) q(t2) must not."""
    vocab = 6
    lm = randomize(build_model(dict(TINY_CONFIGS["llama"], vocab_size=vocab), seed=11), seed=11, scale=0.5).eval()
    model = TidarLM(lm, mask_token_id=vocab - 1, block_size=4)
    prompt = [1, 3, 4]
    with torch.no_grad():
        p1 = torch.softmax(lm(torch.tensor([prompt])).logits[0, -1].double(), -1)
        p2 = torch.stack([torch.softmax(lm(torch.tensor([prompt + [t]])).logits[0, -1].double(), -1)
                          for t in range(vocab)])
        first = build_step_layout(prompt, [], (0,), 4, vocab - 1)
        q2 = torch.softmax(step_forward(model, first, None, 0)[0][2].double(), -1)  # template row at position n + 1
    exact = (p1[:, None] * p2).flatten()
    accept_all = (p1[:, None] * q2[None]).flatten()
    samples = 1500
    results = decode_tidar(model, [prompt] * samples, TidarConfig(max_new_tokens=3, temperature=1.0, seed=0))
    assert all(r.drafts[1] == 1 for r in results)  # the second forward verifies one draft
    assert 0.1 * samples < sum(r.accepted[1] for r in results) < 0.9 * samples  # accepted and rejected both happen
    counts = torch.zeros(vocab * vocab, dtype=torch.float64)
    for r in results:
        counts[r.token_ids[0] * vocab + r.token_ids[1]] += 1
    stat, df = chi_square(counts, exact)
    assert stat < chi_square_critical(df), (stat, df)
    wrong, wrong_df = chi_square(counts, accept_all)
    assert wrong > 3 * chi_square_critical(wrong_df), (wrong, wrong_df)


def test_bad_settings_are_named():
    model = trained("llama")
    with pytest.raises(ValueError, match="sampler must be one of"):
        TidarConfig(sampler="greedy")
    with pytest.raises(ValueError, match="mix_weight must be a number in"):
        TidarConfig(sampler="mixing", mix_weight=1.5)
    with pytest.raises(ValueError, match="only applies to sampler='mixing'"):
        TidarConfig(mix_weight=0.5)
    with pytest.raises(ValueError, match="block_size must be an integer >= 2"):
        TidarConfig(block_size=1)
    with pytest.raises(ValueError, match=r"levels must be .* \[0, 3\]"):
        decode_tidar(model, [[5]], TidarConfig(levels=(4,)))
    with pytest.raises(ValueError, match="levels must be 'all'"):
        decode_tidar(model, [[5]], TidarConfig(levels="some"))
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        decode_tidar(model, [[]])
    with pytest.raises(ValueError, match=r"needs 515 positions .* 512"):
        decode_tidar(model, [[5] * 500], TidarConfig(max_new_tokens=12))
    with pytest.raises(TypeError, match="needs a TidarLM"):
        decode_tidar(model.lm, [[5]])
