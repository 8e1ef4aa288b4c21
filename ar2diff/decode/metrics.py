"""Decode statistics to steer by: tokens per forward with a bootstrap interval over prompts, paired differences
between samplers, and how much of the acceptance comes from repetition.

Why: a phase-end check decodes a few dozen prompts, and tokens per forward (TPF) moves between runs by more than
the differences it is meant to show. Prompts are the unit of variation (one prompt's steps are correlated), so the
interval resamples prompts: TPF of a resample = its tokens / its forwards (the same ratio the point estimate uses).
Two samplers decoded on the same prompts are compared with a paired bootstrap (the same resampled prompts for both),
which cancels the prompt-to-prompt spread they share.

Degeneracy: a tiny model falls into repetition loops that its drafter predicts perfectly, so TPF can be high for
a bad reason. `repetition` marks every generated token inside a repeated n-gram (the n tokens ending at it
occurred earlier in prompt + output) and reports the share of all tokens and of accepted drafts in such spans.

Pure functions of `DecodeResult` lists; deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ar2diff.decode.ar import DecodeResult

BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95
REPEAT_NGRAM = 4


def per_prompt_counts(results: Sequence[DecodeResult]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_P, forwards_P): generated tokens and forwards of each prompt."""
    return (np.array([len(r.token_ids) for r in results], dtype=np.float64),
            np.array([r.forwards for r in results], dtype=np.float64))


def _resample_index(n: int, samples: int, seed: int) -> np.ndarray:
    """(samples, n) unit indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def ratio_interval(numerator: np.ndarray, denominator: np.ndarray, samples: int = BOOTSTRAP_SAMPLES,
                   confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(numerator) / sum(denominator) over units (prompts, held-out rows): each
    resample draws units with replacement and takes the same ratio of sums as the point estimate."""
    numerator, denominator = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    if len(numerator) == 0 or len(numerator) != len(denominator):
        raise ValueError("ratio_interval needs one numerator and one denominator per unit, and at least one unit")
    idx = _resample_index(len(numerator), samples, seed)
    return _interval(numerator[idx].sum(1) / np.maximum(denominator[idx].sum(1), 1e-12), confidence)


def tpf_interval(results: Sequence[DecodeResult], samples: int = BOOTSTRAP_SAMPLES, confidence: float = CONFIDENCE,
                 seed: int = 0) -> dict:
    """{tokens_per_forward, low, high, prompts}: TPF (all tokens / all forwards) and its percentile bootstrap
    interval over prompts."""
    tokens, forwards = per_prompt_counts(results)
    if len(tokens) == 0:
        raise ValueError("tpf_interval needs at least one decoded prompt")
    low, high = ratio_interval(tokens, forwards, samples, confidence, seed)
    return {"tokens_per_forward": float(tokens.sum() / forwards.sum()), "low": low, "high": high,
            "prompts": len(tokens), "confidence": confidence}


def tpf_difference(base: Sequence[DecodeResult], other: Sequence[DecodeResult], samples: int = BOOTSTRAP_SAMPLES,
                   confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """{difference, low, high, below}: TPF(other) - TPF(base) on the same prompts, with a paired bootstrap interval.
    below: "significant" when the whole interval is below 0, "point" when only the estimate is, else None."""
    if len(base) != len(other) or any(a.prompt_ids != b.prompt_ids for a, b in zip(base, other)):
        raise ValueError("tpf_difference compares two samplers on the same prompts, in the same order")
    tb, fb = per_prompt_counts(base)
    to, fo = per_prompt_counts(other)
    idx = _resample_index(len(tb), samples, seed)
    boot = to[idx].sum(1) / fo[idx].sum(1) - tb[idx].sum(1) / fb[idx].sum(1)
    low, high = _interval(boot, confidence)
    diff = float(to.sum() / fo.sum() - tb.sum() / fb.sum())
    below = "significant" if high < 0 else "point" if diff < 0 else None
    return {"difference": diff, "low": low, "high": high, "below": below, "confidence": confidence}


def repeated_ngram_flags(context: Sequence[int], generated: Sequence[int], n: int = REPEAT_NGRAM) -> list[bool]:
    """flags[j]: generated token j is inside a repeated n-gram: some n-gram of context + generated that covers it
    also occurs earlier (its first occurrence starts before it)."""
    seq = list(context) + list(generated)
    first_seen: dict[tuple[int, ...], int] = {}
    flags = [False] * len(seq)
    for start in range(len(seq) - n + 1):
        gram = tuple(seq[start:start + n])
        if gram in first_seen:
            for j in range(start, start + n):
                flags[j] = True
        else:
            first_seen[gram] = start
    return flags[len(context):]


def accepted_flags(result: DecodeResult) -> list[bool]:
    """flags[j]: generated token j was an accepted draft (not the verifier's token) -- forward i commits
    accepted[i] drafts, then one token; the tail cut at max_new_tokens is dropped."""
    out = []
    for a in result.accepted:
        out += [True] * a + [False]
    return out[:len(result.token_ids)]


def repetition(results: Sequence[DecodeResult], n: int = REPEAT_NGRAM, seed: int = 0) -> dict:
    """{repeated_share, accepted_in_repeats, accepted_drafts, tokens_per_forward_outside_repeats (+ _low, _high)}:
    the share of generated tokens inside repeated n-grams, the share of accepted drafts inside them, and TPF when
    accepted drafts inside repeats are not counted (each such draft counted as costing its own forward would be
    stricter; this removes only their contribution to the numerator), with its bootstrap interval over prompts.
    TPF outside repeats is the drafter's speed on text that is not a loop: the figure to steer a small model by."""
    tokens_P, accepted_rep_P, forwards_P = [], [], []
    repeated = accepted = 0
    for r in results:
        rep = repeated_ngram_flags(r.prompt_ids, r.token_ids, n)
        acc = accepted_flags(r)
        tokens_P.append(len(rep))
        repeated += sum(rep)
        accepted += sum(acc)
        accepted_rep_P.append(sum(a and b for a, b in zip(acc, rep)))
        forwards_P.append(r.forwards)
    tokens, accepted_rep, forwards = sum(tokens_P), sum(accepted_rep_P), sum(forwards_P)
    out = {"ngram": n, "repeated_share": repeated / max(tokens, 1),
           "accepted_in_repeats": accepted_rep / accepted if accepted else 0.0, "accepted_drafts": accepted,
           "tokens_per_forward_outside_repeats": (tokens - accepted_rep) / max(forwards, 1)}
    if results:
        low, high = ratio_interval(np.subtract(tokens_P, accepted_rep_P), forwards_P, seed=seed)
        out.update({"tokens_per_forward_outside_repeats_low": low, "tokens_per_forward_outside_repeats_high": high})
    return out


def full_draft_histogram(results: Sequence[DecodeResult], num_drafts: int) -> list[int]:
    """counts[a] over forwards that verified exactly `num_drafts` drafts: the acceptance-length distribution with a
    full block of drafts, not mixed with the first step (no drafts) or steps with fewer drafts (what
    `ar2diff.decode.levels` models)."""
    counts = [0] * (num_drafts + 1)
    for r in results:
        for a, k in zip(r.accepted, r.drafts):
            if k == num_drafts:
                counts[a] += 1
    return counts


def decode_statistics(results: dict[str, Sequence[DecodeResult]], kinds: dict[str, str], num_drafts: int,
                      seed: int = 0) -> dict:
    """The phase-end statistics of one temperature's decodes ({sampler: results}, all on the same prompts):
    per sampler the TPF interval and repetition figures (TiDAR samplers also the full-draft histogram), and every
    mixing sampler's paired TPF difference to lossless, with a note when mixing falls below."""
    out: dict = {"samplers": {}, "mixing_minus_lossless": {}, "notes": []}
    for name, res in results.items():
        entry = {"tpf": tpf_interval(res, seed=seed), "repetition": repetition(res, seed=seed)}
        if kinds[name] != "ar":
            entry["full_draft_histogram"] = full_draft_histogram(res, num_drafts)
        out["samplers"][name] = entry
    if "lossless" in results:
        for name, res in results.items():
            if kinds[name] != "mixing":
                continue
            d = tpf_difference(results["lossless"], res, seed=seed)
            out["mixing_minus_lossless"][name] = d
            if d["below"]:
                out["notes"].append(
                    f"{name} tokens/forward is below lossless by {-d['difference']:.3f} "
                    f"({d['confidence']:.0%} interval [{d['low']:.3f}, {d['high']:.3f}]"
                    + (", entirely below 0)" if d["below"] == "significant" else ", which includes 0)"))
    return out


def flat_statistics(stats: dict, prefix: str) -> dict[str, float]:
    """Scalars of `decode_statistics` for logging: <prefix>/<sampler>/tpf(_low|_high), repeated shares, and the
    mixing-lossless differences."""
    out = {}
    for name, s in stats["samplers"].items():
        t, r = s["tpf"], s["repetition"]
        out.update({f"{prefix}/{name}/tpf": t["tokens_per_forward"], f"{prefix}/{name}/tpf_low": t["low"],
                    f"{prefix}/{name}/tpf_high": t["high"], f"{prefix}/{name}/repeated_share": r["repeated_share"],
                    f"{prefix}/{name}/accepted_in_repeats": r["accepted_in_repeats"]})
        for key in ("", "_low", "_high"):
            if f"tokens_per_forward_outside_repeats{key}" in r:
                out[f"{prefix}/{name}/tpf_outside_repeats{key}"] = r[f"tokens_per_forward_outside_repeats{key}"]
    for name, d in stats["mixing_minus_lossless"].items():
        out.update({f"{prefix}/{name}/minus_lossless": d["difference"],
                    f"{prefix}/{name}/minus_lossless_low": d["low"], f"{prefix}/{name}/minus_lossless_high": d["high"]})
    return out
