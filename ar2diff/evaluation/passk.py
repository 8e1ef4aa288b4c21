"""pass@k of held-out continuations: does a sampler reproduce the text that actually followed a prompt?

Held-out documents are cut into a prompt (a prefix of `prompt_len` tokens) and a target (the next `target_len`
tokens). A sampler draws n samples per prompt at a stated temperature; a sample passes when its first
`target_len` tokens equal the target. pass@k uses the unbiased estimator of Chen et al. 2021 (HumanEval, eq. 1):
pass@k = E_prompts[1 - C(n - c, k) / C(n, k)] with c passing samples out of n. Intervals are percentile
bootstrap intervals over prompts (resampling prompts with a fixed seed); a difference between two samplers on the
same prompts is bootstrapped paired, so "lossless matches AR" is: the interval of the difference contains 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from math import comb

import torch

from ar2diff.decode.run import run_decoder
from ar2diff.evaluation.heldout import select_prompts

Generate = Callable[[list[list[int]], int], list[list[int]]]  # (prompts, seed) -> generated ids per prompt


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def continuation_tasks(rows: dict[str, torch.Tensor], num_prompts: int, prompt_len: int,
                       target_len: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids) pairs: the first prompt_len + target_len tokens of document segments, one per
    segment, round-robin over rows (as the phase-end decoder picks its prompts). Deterministic."""
    picks = select_prompts(rows, num_prompts, prompt_len + target_len)
    ids = rows["input_ids"]
    return [(ids[r, s:s + prompt_len].tolist(), ids[r, s + prompt_len:s + prompt_len + target_len].tolist())
            for r, s in picks]


def count_correct(generate: Generate, tasks: Sequence[tuple[list[int], list[int]]], n: int,
                  seed: int = 0) -> list[int]:
    """Per task, how many of n samples start with the target. Sample j of every prompt uses seed + 1000 * j
    (the decoders seed prompt i with seed + i), so samples are independent draws and runs repeat exactly."""
    prompts = [p for p, _ in tasks]
    correct = [0] * len(tasks)
    for j in range(n):
        for i, (out, (_, target)) in enumerate(zip(generate(prompts, seed + 1000 * j), tasks)):
            correct[i] += list(out[:len(target)]) == list(target)
    return correct


def _bootstrap(values_P: torch.Tensor, draws: int, seed: int, confidence: float) -> tuple[float, float]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, values_P.numel(), (draws, values_P.numel()), generator=g)
    means = values_P[idx].mean(dim=1)
    tail = (1 - confidence) / 2
    lo, hi = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=means.dtype)).tolist()
    return lo, hi


def per_prompt(correct: Sequence[int], n: int, k: int) -> torch.Tensor:
    return torch.tensor([pass_at_k(n, c, k) for c in correct], dtype=torch.float64)


def passk_summary(correct: Sequence[int], n: int, ks: Sequence[int], confidence: float = 0.95,
                  draws: int = 2000, seed: int = 0) -> dict:
    """{"pass@k": {"value", "low", "high"}} for every k <= n, plus the raw counts."""
    out = {"samples_per_prompt": n, "prompts": len(correct), "correct": list(correct), "confidence": confidence}
    for k in sorted({int(k) for k in ks if 1 <= k <= n}):
        vals = per_prompt(correct, n, k)
        lo, hi = _bootstrap(vals, draws, seed, confidence)
        out[f"pass@{k}"] = {"value": float(vals.mean()), "low": lo, "high": hi}
    return out


def paired_difference(correct_a: Sequence[int], correct_b: Sequence[int], n: int, k: int, confidence: float = 0.95,
                      draws: int = 2000, seed: int = 0) -> dict:
    """pass@k(a) - pass@k(b) on the same prompts, with its paired bootstrap interval; `consistent` when the
    interval contains 0 (no evidence that the two samplers differ)."""
    diff = per_prompt(correct_a, n, k) - per_prompt(correct_b, n, k)
    lo, hi = _bootstrap(diff, draws, seed, confidence)
    return {"k": k, "value": float(diff.mean()), "low": lo, "high": hi, "consistent": lo <= 0.0 <= hi}


def vs_reference(correct: Sequence[int], reference: Sequence[int], n: int, ks: Sequence[int],
                 confidence: float = 0.95, seed: int = 0) -> dict:
    """{"pass@k": paired difference to the reference} for every k, and `consistent`: every interval contains 0."""
    out = {f"pass@{k}": paired_difference(correct, reference, n, k, confidence, seed=seed) for k in ks}
    out["consistent"] = all(d["consistent"] for d in out.values())
    return out


def decoder_generate(model, cfg, run_decoder) -> Generate:
    """A `Generate` from an ar2diff decoder config (AR or TiDAR), via the phase-end check's `run_decoder`."""
    def generate(prompts: list[list[int]], seed: int) -> list[list[int]]:
        return [r.token_ids for r in run_decoder(model, prompts, replace(cfg, seed=seed))]

    return generate


def evaluate_passk(model, rows: dict[str, torch.Tensor], sampler_cfgs: dict, *, num_prompts: int, prompt_len: int,
                   target_len: int, samples: int, ks: Sequence[int], confidence: float = 0.95,
                   seed: int = 0) -> dict:
    """pass@k per sampler on held-out continuations, and every TiDAR sampler's difference to AR at every k.

    sampler_cfgs: {name: DecodeConfig/TidarConfig} with max_new_tokens >= target_len and the stated temperature
    (the phase-end check builds them with `sampler_configs`); "ar" must be among them.
    """
    tasks = continuation_tasks(rows, num_prompts, prompt_len, target_len)
    correct = {name: count_correct(decoder_generate(model, cfg, run_decoder), tasks, samples, seed)
               for name, cfg in sampler_cfgs.items()}
    ks = sorted({int(k) for k in ks if 1 <= k <= samples})
    first = next(iter(sampler_cfgs.values()))
    return {
        "settings": {"prompts": len(tasks), "prompt_len": prompt_len, "target_len": target_len, "samples": samples,
                     "ks": ks, "temperature": first.temperature,
                     "top_p": first.top_p, "confidence": confidence, "interval": "percentile bootstrap over prompts"},
        "samplers": {name: passk_summary(c, samples, ks, confidence, seed=seed) for name, c in correct.items()},
        "vs_ar": {name: vs_reference(c, correct["ar"], samples, ks, confidence, seed)
                  for name, c in correct.items() if name != "ar"},
    }
