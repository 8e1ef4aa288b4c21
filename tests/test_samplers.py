"""Samplers: greedy verification, statistical losslessness (with broken samplers as controls), mixing, top-p."""

import pytest
import torch

from ar2diff.decode.samplers import (
    mix_logits,
    mixing_verifier_probs,
    probs_from_logits,
    sample,
    verifier_and_drafter_probs,
    verify_lossless,
    verify_lossless_batch,
    verify_mixing,
)

# Chi-square critical values at significance 1e-4 (upper tail), hardcoded because scipy is not installed.
# df = V - 1 = 4 for a marginal over V = 5 tokens, df = V*V - 1 = 24 for the joint of two tokens.
# test_critical_values_match_the_chi_square_tail re-derives them with torch.special.gammaincc.
CHI2_CRIT_1E4 = {4: 23.5127, 24: 58.6130}
V, K = 5, 3
NUM_SAMPLES = 40_000


def chi_square(tokens_N: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson statistic of the observed token counts against the expected distribution (all cells > 0)."""
    observed = torch.bincount(tokens_N, minlength=expected_probs.numel()).double()
    expected = expected_probs.double().flatten() * tokens_N.numel()
    return float(((observed - expected) ** 2 / expected).sum())


def test_critical_values_match_the_chi_square_tail():
    for df, crit in CHI2_CRIT_1E4.items():
        half_df, half_crit = torch.tensor([df / 2, crit / 2], dtype=torch.float64)
        tail = torch.special.gammaincc(half_df, half_crit)  # chi-square upper tail P(X > crit)
        assert abs(float(tail) - 1e-4) < 2e-6, (df, float(tail))


# ---------------------------------------------------------------- greedy


def test_greedy_accepts_the_matching_prefix_and_emits_the_argmax():
    gen = torch.Generator().manual_seed(0)
    data = torch.Generator().manual_seed(1)
    for _ in range(300):
        k = int(torch.randint(0, 6, (1,), generator=data))
        ar_logits = torch.randn(k + 1, 7, generator=data)
        argmax = ar_logits.argmax(-1)
        # Drafts: the AR argmax up to a random mismatch position (or none).
        drafts = argmax[:k].clone()
        first_bad = int(torch.randint(0, k + 1, (1,), generator=data))
        if first_bad < k:
            drafts[first_bad] = (argmax[first_bad] + 1 + torch.randint(0, 6, (1,), generator=data)) % 7
        if first_bad + 1 < k:  # tokens after the mismatch are random, may or may not match
            drafts[first_bad + 1 :] = torch.randint(0, 7, (k - first_bad - 1,), generator=data)
        p = probs_from_logits(ar_logits, temperature=0)
        q_onehot = torch.nn.functional.one_hot(drafts, 7).float()
        q_random = torch.softmax(torch.randn(k, 7, generator=data), -1)
        for q in (q_onehot, q_random):
            num_accepted, next_token = verify_lossless(p, q, drafts, gen)
            assert num_accepted == first_bad
            assert next_token == int(argmax[first_bad])


def test_probs_from_logits_greedy_is_one_hot_argmax_first_on_ties():
    logits = torch.tensor([[0.0, 3.0, 3.0, -1.0], [5.0, 1.0, 2.0, 0.0]])
    assert torch.equal(probs_from_logits(logits, 0), torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0]]))


# ---------------------------------------------------------------- statistical losslessness

# Per-position AR (p) and drafter (q) distributions, fixed and independent of the prefix, all different.
P_TABLE = torch.softmax(torch.randn(12, V, generator=torch.Generator().manual_seed(11)) * 1.2, -1)
Q_TABLE = torch.softmax(torch.randn(12, V, generator=torch.Generator().manual_seed(12)) * 1.2, -1)


def broken_verifier(accept_with_q_over_p: bool, resample_from_p: bool):
    """A deliberately wrong verifier (test control), vectorised like verify_lossless_batch.

    accept_with_q_over_p: accepts with min(1, q/p) instead of min(1, p/q).
    resample_from_p: at a rejection samples from p instead of normalize(max(0, p - q)).
    """

    def verify(p_NKV, q_NKV, drafts_NK, generator):
        N, k = drafts_NK.shape
        p_draft = p_NKV[:, :k].gather(-1, drafts_NK[..., None]).squeeze(-1)
        q_draft = q_NKV.gather(-1, drafts_NK[..., None]).squeeze(-1)
        u = torch.rand((N, k), generator=generator)
        accept = u * p_draft < q_draft if accept_with_q_over_p else u * q_draft < p_draft
        n_acc = accept.long().cumprod(-1).sum(-1)
        rows = torch.arange(N)
        p_next = p_NKV[rows, n_acc]
        q_next = torch.cat([q_NKV, torch.zeros(N, 1, q_NKV.shape[-1])], 1)[rows, n_acc]
        dist = p_next if resample_from_p else (p_next - q_next).clamp_min(0)
        dist = torch.where(dist.sum(-1, keepdim=True) > 0, dist, p_next)
        return n_acc, sample(dist, generator)

    return verify


def simulate(verify, num_tokens: int, seed: int) -> torch.Tensor:
    """Decode NUM_SAMPLES sequences of num_tokens tokens: draft K tokens from q, verify against p, repeat.

    Fully vectorised over sequences; returns (N, num_tokens) emitted tokens.
    """
    gen = torch.Generator().manual_seed(seed)
    N = NUM_SAMPLES
    out_NL = torch.full((N, num_tokens + K + 1), -1, dtype=torch.long)
    pos_N = torch.zeros(N, dtype=torch.long)
    while bool((pos_N < num_tokens).any()):
        live = (pos_N < num_tokens).nonzero().squeeze(-1)
        pos = pos_N[live]
        offsets = torch.arange(K + 1)
        p_NKV = P_TABLE[pos[:, None] + offsets]
        q_NKV = Q_TABLE[pos[:, None] + offsets[:K]]
        drafts_NK = sample(q_NKV, gen)
        n_acc, nxt = verify(p_NKV, q_NKV, drafts_NK, gen)
        for j in range(K + 1):  # offsets < n_acc emit the accepted drafts, offset n_acc the next token
            token = drafts_NK[:, j] if j < K else nxt
            token = torch.where(n_acc == j, nxt, token)
            write = j <= n_acc
            out_NL[live[write], pos[write] + j] = token[write]
        pos_N[live] = pos + n_acc + 1
    return out_NL[:, :num_tokens]


@pytest.fixture(scope="module")
def lossless_tokens():
    return simulate(verify_lossless_batch, num_tokens=5, seed=0)


def test_emitted_tokens_follow_the_ar_distribution_at_every_position(lossless_tokens):
    # Positions 0..4 cover a first rejection, the bonus token (position K) and tokens from a second step.
    for t in range(lossless_tokens.shape[1]):
        stat = chi_square(lossless_tokens[:, t], P_TABLE[t])
        assert stat < CHI2_CRIT_1E4[4], (t, stat)


def test_first_two_tokens_jointly_follow_the_ar_distribution(lossless_tokens):
    joint = P_TABLE[0][:, None] * P_TABLE[1][None, :]  # p is prefix-independent here: product of marginals
    stat = chi_square(lossless_tokens[:, 0] * V + lossless_tokens[:, 1], joint)
    assert stat < CHI2_CRIT_1E4[24], stat


@pytest.mark.parametrize("accept_with_q_over_p,resample_from_p", [(False, True), (True, False)])
def test_the_same_statistics_reject_broken_samplers(accept_with_q_over_p, resample_from_p):
    tokens = simulate(broken_verifier(accept_with_q_over_p, resample_from_p), num_tokens=2, seed=0)
    first = chi_square(tokens[:, 0], P_TABLE[0])
    joint = chi_square(tokens[:, 0] * V + tokens[:, 1], P_TABLE[0][:, None] * P_TABLE[1][None, :])
    assert first > CHI2_CRIT_1E4[4], first
    assert joint > CHI2_CRIT_1E4[24], joint


def test_single_row_verify_matches_the_batch_row():
    p = P_TABLE[:K + 1]
    q = Q_TABLE[:K]
    for seed in range(20):
        drafts = sample(q, torch.Generator().manual_seed(100 + seed))
        single = verify_lossless(p, q, drafts, torch.Generator().manual_seed(seed))
        n, t = verify_lossless_batch(p[None], q[None], drafts[None], torch.Generator().manual_seed(seed))
        assert single == (int(n[0]), int(t[0]))


def test_residual_edge_p_equals_q_samples_from_p():
    # Draft outside both supports: always rejected, residual max(0, p - q) is all zero because p == q.
    p = torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.0, 1.0]])
    q = torch.tensor([[0.0, 0.5, 0.5]])
    gen = torch.Generator().manual_seed(0)
    tokens = [verify_lossless(p, q, torch.tensor([0]), gen) for _ in range(200)]
    assert {n for n, _ in tokens} == {0}
    assert {t for _, t in tokens} == {1, 2}


def test_shape_errors_name_the_expected_shapes():
    with pytest.raises(ValueError, match=r"p must be \(N, K\+1, V\)"):
        verify_lossless(torch.rand(3, 5), torch.rand(3, 5), torch.tensor([0, 1, 2]), torch.Generator())


# ---------------------------------------------------------------- logit mixing


def _mixing_case(seed=3):
    g = torch.Generator().manual_seed(seed)
    ar_logits = torch.randn(K + 1, V, generator=g) * 2
    diff_logits = torch.randn(K, V, generator=g) * 2
    return ar_logits, diff_logits


def test_mixing_weight_zero_is_lossless_token_for_token():
    ar_logits, diff_logits = _mixing_case()
    ar_logits[0, 0] = float("-inf")  # a banned token must not turn into NaN through 0 * -inf
    diff_logits[1, 2] = float("-inf")
    for temperature, top_p in [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)]:
        p, q = verifier_and_drafter_probs(ar_logits, diff_logits, temperature, top_p)
        for seed in range(50):
            drafts = sample(q, torch.Generator().manual_seed(1000 + seed))
            lossless = verify_lossless(p, q, drafts, torch.Generator().manual_seed(seed))
            mixing = verify_mixing(
                ar_logits, diff_logits, q, drafts, 0.0, torch.Generator().manual_seed(seed), temperature, top_p
            )
            assert mixing == lossless


def test_mixing_weight_one_accepts_every_draft_from_the_diffusion_distribution():
    ar_logits, diff_logits = _mixing_case()
    p, q = verifier_and_drafter_probs(ar_logits, diff_logits, 0.8, 0.95, weight=1.0)
    assert torch.equal(p[:K], q)
    gen = torch.Generator().manual_seed(0)
    drafts_NK = sample(q.expand(5000, K, V), gen)
    n_acc, _ = verify_lossless_batch(p.expand(5000, K + 1, V), q.expand(5000, K, V), drafts_NK, gen)
    assert bool((n_acc == K).all())


def expected_accepted(p_KV: torch.Tensor, q_KV: torch.Tensor) -> float:
    """Exact E[num accepted] for prefix-independent p, q: sum_j prod_{i<=j} beta_i, beta_i = sum min(p_i, q_i)."""
    beta_K = torch.minimum(p_KV[: q_KV.shape[0]], q_KV).sum(-1).double()
    return float(beta_K.cumprod(0).sum())


def test_acceptance_rate_does_not_decrease_with_the_mixing_weight():
    ar_logits, diff_logits = _mixing_case()
    q = probs_from_logits(diff_logits)
    weights = [i / 20 for i in range(21)]
    exact = [expected_accepted(mixing_verifier_probs(ar_logits, diff_logits, w), q) for w in weights]
    assert all(b >= a - 1e-6 for a, b in zip(exact, exact[1:])), exact
    assert exact[0] < 0.9 * exact[-1] and abs(exact[-1] - K) < 1e-5
    # The sampler's empirical mean matches the exact expectation (checks the rule, not just the formula).
    N = 20_000
    gen = torch.Generator().manual_seed(0)
    for w, want in zip(weights[::5], exact[::5]):
        p = mixing_verifier_probs(ar_logits, diff_logits, w)
        drafts_NK = sample(q.expand(N, K, V), gen)
        n_acc, _ = verify_lossless_batch(p.expand(N, K + 1, V), q.expand(N, K, V), drafts_NK, gen)
        assert abs(n_acc.double().mean().item() - want) < 0.03, (w, n_acc.double().mean().item(), want)


def test_mix_logits_blends_and_validates_the_weight():
    a, d = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 2.0])
    assert torch.allclose(mix_logits(a, d, 0.25), torch.tensor([1.5, -1.0]))
    assert mix_logits(a, d, 0) is a and mix_logits(a, d, 1.0) is d
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"mixing weight must be a number in \[0, 1\]"):
            mix_logits(a, d, bad)


# ---------------------------------------------------------------- temperature and top-p


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = probs.log()
    # Sorted: 0.4 (1), 0.3 (3), 0.15 (4), 0.1 (2), 0.05 (0); cumulative 0.4, 0.7, 0.85, 0.95, 1.0.
    # Exact boundaries (top_p == a cumulative mass) depend on float rounding, so the cases sit beside them.
    everything = [0, 1, 2, 3, 4]
    cases = {0.3: [1], 0.39: [1], 0.41: [1, 3], 0.69: [1, 3], 0.72: [1, 3, 4], 0.9: [1, 3, 4, 2]}
    cases |= {0.96: everything, 1.0: everything}
    for top_p, kept in cases.items():
        out = probs_from_logits(logits, 1.0, top_p)
        mask = torch.zeros(5, dtype=torch.bool)
        mask[kept] = True
        assert torch.equal(out > 0, mask), (top_p, out)
        assert torch.allclose(out[mask], probs[mask] / probs[mask].sum())


def test_temperature_scales_logits_before_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for t in (0.5, 1.0, 2.0):
        assert torch.allclose(probs_from_logits(logits, t), torch.softmax(logits / t, -1))
    # Temperature is applied before top-p: at t = 2 the flatter distribution keeps more tokens for the same p.
    assert int((probs_from_logits(logits, 0.5, 0.8) > 0).sum()) == 1
    assert int((probs_from_logits(logits, 2.0, 0.8) > 0).sum()) == 3


def test_bad_temperature_or_top_p_name_the_argument():
    with pytest.raises(ValueError, match="temperature must be"):
        probs_from_logits(torch.zeros(3), -1.0)
    with pytest.raises(ValueError, match="top_p must be in"):
        probs_from_logits(torch.zeros(3), 1.0, 0.0)
