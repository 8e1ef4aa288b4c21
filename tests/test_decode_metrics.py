"""Phase-end decode statistics: bootstrap intervals, paired differences, repetition shares, full-draft histograms."""

import pytest

from ar2diff.decode.ar import DecodeResult
from ar2diff.decode.metrics import (accepted_flags, decode_statistics, flat_statistics, full_draft_histogram,
                                    ratio_interval, repeated_ngram_flags, repetition, tpf_difference, tpf_interval)


def result(prompt, tokens, accepted, drafts=None):
    return DecodeResult(prompt_ids=list(prompt), token_ids=list(tokens), forwards=len(accepted),
                        accepted=list(accepted), drafts=list(drafts or [7] * len(accepted)), wall_time_s=1.0,
                        stop="max_new_tokens")


def spread(n, base, jitter):
    """n prompts of 20 tokens whose forward counts alternate around 20 / base."""
    out = []
    for i in range(n):
        forwards = max(1, round(20 / base) + (jitter if i % 2 else -jitter))
        out.append(result([i, i + 1], range(100, 120), [0] * forwards))
    return out


def test_interval_contains_the_estimate_narrows_with_prompts_and_is_deterministic():
    few, many = spread(8, 2.0, 3), spread(64, 2.0, 3)
    a, b = tpf_interval(few), tpf_interval(many)
    assert a["low"] <= a["tokens_per_forward"] <= a["high"]
    assert a["tokens_per_forward"] == pytest.approx(160 / sum(r.forwards for r in few))
    assert b["high"] - b["low"] < a["high"] - a["low"]
    assert tpf_interval(few, seed=3) == tpf_interval(few, seed=3)
    same = [result([1], range(10), [0] * 5)] * 4
    assert tpf_interval(same)["low"] == tpf_interval(same)["high"] == 2.0  # no spread, no width


def test_paired_difference_separates_a_consistent_gain_and_flags_mixing_below():
    lossless = spread(16, 2.0, 3)
    better = [result(r.prompt_ids, r.token_ids, [0] * (r.forwards - 2)) for r in lossless]
    d = tpf_difference(lossless, better)
    assert d["difference"] > 0 and d["low"] > 0 and d["below"] is None
    worse = tpf_difference(better, lossless)
    assert worse["below"] == "significant" and worse["high"] < 0
    stats = decode_statistics({"lossless": better, "mixing_0.5": lossless}, {"lossless": "lossless",
                                                                             "mixing_0.5": "mixing"}, 7)
    assert stats["mixing_minus_lossless"]["mixing_0.5"]["below"] == "significant"
    assert len(stats["notes"]) == 1 and "mixing_0.5" in stats["notes"][0] and "below lossless" in stats["notes"][0]
    with pytest.raises(ValueError, match="same prompts"):
        tpf_difference(lossless, better[::-1])


def test_repeated_ngrams_and_accepted_drafts():
    # prompt 1 2 3; output 4 1 2 3 4 9: "1 2 3 4"? the 4-gram (2,3,4,1)... only repeats of length >= n count
    flags = repeated_ngram_flags([1, 2, 3, 4], [5, 1, 2, 3, 4, 9], n=4)
    assert flags == [False, True, True, True, True, False]
    assert repeated_ngram_flags([1, 2], [3, 4, 5], n=2) == [False, False, False]
    r = result([1, 2, 3, 4], [5, 1, 2, 3, 4, 9], accepted=[0, 3, 0, 0], drafts=[0, 3, 3, 3])
    assert accepted_flags(r) == [False, True, True, True, False, False]
    rep = repetition([r], n=4)
    assert rep["repeated_share"] == pytest.approx(4 / 6)
    assert rep["accepted_in_repeats"] == 1.0 and rep["accepted_drafts"] == 3
    assert rep["tokens_per_forward_outside_repeats"] == pytest.approx(3 / 4)


def test_tpf_outside_repeats_has_an_interval_over_prompts():
    looping = result([1, 2, 3, 4], [5, 1, 2, 3, 4, 9], accepted=[0, 3, 0, 0], drafts=[0, 3, 3, 3])  # 3 tokens / 4 fwd
    fresh = result([7, 8], [20, 21, 22, 23, 24, 25], accepted=[0, 2, 1], drafts=[0, 3, 3])  # no repeats: 6 / 3
    one = repetition([fresh])
    assert one["tokens_per_forward_outside_repeats_low"] == one["tokens_per_forward_outside_repeats_high"] == 2.0
    rep = repetition([looping, fresh] * 4)
    assert rep["tokens_per_forward_outside_repeats"] == pytest.approx(36 / 28)
    low, high = rep["tokens_per_forward_outside_repeats_low"], rep["tokens_per_forward_outside_repeats_high"]
    assert 3 / 4 <= low < rep["tokens_per_forward_outside_repeats"] < high <= 2.0
    flat = flat_statistics(decode_statistics({"lossless": [looping, fresh] * 4}, {"lossless": "lossless"}, 3), "t0")
    assert (flat["t0/lossless/tpf_outside_repeats_low"], flat["t0/lossless/tpf_outside_repeats_high"]) == (low, high)


def test_ratio_interval_is_a_ratio_of_sums_and_checks_its_inputs():
    assert ratio_interval([2, 2, 2], [1, 1, 1]) == (2.0, 2.0)
    low, high = ratio_interval([1, 3] * 10, [1, 1] * 10)
    assert 1.0 < low < 2.0 < high < 3.0
    with pytest.raises(ValueError, match="one numerator and one denominator per unit"):
        ratio_interval([1, 2], [1])
    with pytest.raises(ValueError, match="at least one unit"):
        ratio_interval([], [])


def test_full_draft_histogram_keeps_only_forwards_with_a_full_block():
    r = result([1], range(12), accepted=[0, 3, 7, 2, 1], drafts=[0, 7, 7, 4, 7])
    assert full_draft_histogram([r], 7) == [0, 1, 0, 1, 0, 0, 0, 1]
