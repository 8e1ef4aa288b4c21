"""`--levels auto`: the set of drafted acceptance levels that maximizes projected decoding throughput on a device.

Drafting a template for every acceptance level (TiDAR, "all") makes every outcome continue with a full block of
drafts, but each template costs block_size positions in the forward; Zyphra's (4, 7, 10) at block 16 drafts three.
Which set is best depends on the acceptance distribution and on how a forward's time grows with its width on the
device (flat while memory-bound, linear once compute-bound). This module

1. models decoding with a level set L as a Markov chain over k, the drafts a step verifies. With a full block
   (k = B-1) the accepted length A follows the measured histogram (forwards that verified B-1 drafts); with k drafts
   it is min(A, k) (acceptance is a prefix: a shorter draft block truncates it). After a drafts are accepted the
   template of l = max{l in L: l <= a} continues, so the next step verifies B-1-(a-l) drafts (0 when no level
   <= a was drafted); a step where no level of L can happen (k < min L) drafts level 0, like the decoder
   (`step_layout.step_levels`). A tiny restart rate to k = 0 (a new prompt) makes the chain's stationary
   distribution unique. TPF(L) = E[a] + 1 under it.
2. prices a forward of T = (B-1) + |L| * B tokens (the static shape a serving kernel allocates) with a cost
   function: the roofline of `ar2diff.decode.projection` for an accelerator preset, or times measured on this
   machine (`cpu_cost`), and compares tokens per second to AR's one token per forward of cost(1).
3. picks the level set with the highest projected speedup. Cost depends only on the number of levels, so per
   size only the set with the highest TPF matters: searched exhaustively for up to 5 levels (3 beyond block 16,
   which covers Zyphra's), greedily above, up to "all". The choice is never projected below "all" or Zyphra's.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ar2diff.decode.metrics import full_draft_histogram
from ar2diff.decode.projection import ACCELERATORS, ModelShape, forward_cost
from ar2diff.decode.tidar import decode_tidar
from ar2diff.model.params import model_shape

HARDWARE = {"mi300x": "MI300X", "mi355x": "MI355X", "h100": "H100 SXM", "cpu": None}
ZYPHRA_LEVELS_16 = (4, 7, 10)
RESTART = 1e-6  # per-step chance the chain restarts at k = 0 (a new prompt); makes the stationary law unique
EXHAUSTIVE_SIZE = 5  # level sets up to this size are searched exhaustively (block <= 16), larger ones greedily
CostFn = Callable[[int], float]  # tokens per sequence in one forward -> seconds


def zyphra_levels(block_size: int) -> tuple[int, ...] | None:
    """(4, 7, 10) at block 16, scaled to block_size (rounded half up, deduplicated); None where the scaled set would
    not be three distinct levels in [1, B-1] (e.g. block 8 gives (2, 4, 5); block 4 has no equivalent)."""
    scaled = tuple(sorted({int(level * block_size / 16 + 0.5) for level in ZYPHRA_LEVELS_16}))
    return scaled if len(scaled) == 3 and 1 <= scaled[0] and scaled[-1] <= block_size - 1 else None


def acceptance_law(histogram: Sequence[float], block_size: int) -> np.ndarray:
    """P(A = a), a = 0..B-1, from a histogram of accepted drafts with a full block (index = drafts accepted)."""
    counts = np.zeros(block_size)
    values = np.asarray(histogram, dtype=np.float64)
    if len(values) > block_size or values.sum() <= 0 or (values < 0).any():
        raise ValueError(f"the acceptance histogram must have at most block_size={block_size} non-negative counts "
                         f"with a positive total, got {list(histogram)}")
    counts[:len(values)] = values
    return counts / counts.sum()


def _subsets(block_size: int, max_size: int) -> np.ndarray:
    """(N, B) boolean rows: every level set of 1..max_size levels."""
    combos = [c for m in range(1, max_size + 1) for c in itertools.combinations(range(block_size), m)]
    masks = np.zeros((len(combos), block_size), dtype=bool)
    for i, c in enumerate(combos):
        masks[i, list(c)] = True
    return masks


def best_level_sets(law: np.ndarray) -> dict[int, tuple[tuple[int, ...], float]]:
    """{size m: (levels, TPF)}: the level set of m levels with the highest TPF, for m = 1..B. Exhaustive up to
    EXHAUSTIVE_SIZE levels (3 beyond block 16), then greedy: the best set of m+1 adds one level to the best of m
    (m = B is every level)."""
    B = len(law)
    masks = _subsets(B, min(B, EXHAUSTIVE_SIZE if B <= 16 else 3))
    tpf = chain_tpf(law, masks)
    sizes = masks.sum(1)
    best = {}
    for m in np.unique(sizes):
        i = int(np.flatnonzero(sizes == m)[np.argmax(tpf[sizes == m])])
        best[int(m)] = (masks[i], float(tpf[i]))
    while max(best) < B:
        mask, _ = best[max(best)]
        grown = np.array([mask | (np.arange(B) == level) for level in np.flatnonzero(~mask)])
        t = chain_tpf(law, grown)
        best[max(best) + 1] = (grown[int(np.argmax(t))], float(t.max()))
    return {m: (tuple(int(v) for v in np.flatnonzero(mask)), t) for m, (mask, t) in best.items()}


def chain_tpf(law: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """TPF of each level set (rows of `masks`, (N, B)) under the acceptance law `law` (B,): the stationary mean of
    accepted drafts + 1 of the chain in the module docstring."""
    N, B = masks.shape
    tail = law[::-1].cumsum()[::-1]  # tail[j] = P(A >= j)
    best_below = np.maximum.accumulate(np.where(masks, np.arange(B), -1), axis=1)  # (N, B): max level <= a, or -1
    reward = np.zeros(B)  # E[a | k], the same for every level set
    flat, weight = [], []  # entries of T (N, B, B) as flat indices, summed in one bincount
    base = np.arange(N) * B * B
    for k in range(B):
        none_drafted = best_below[:, k] < 0  # no level of L can happen with k drafts: the step drafts level 0
        for a in range(k + 1):
            p = law[a] if a < k else tail[k]
            level = np.where(none_drafted, 0, best_below[:, a])
            nxt = np.where(level >= 0, B - 1 - (a - level), 0)
            flat.append(base + k * B + nxt)
            weight.append(np.full(N, p))
            reward[k] += p * a
    T = np.bincount(np.concatenate(flat), np.concatenate(weight), minlength=N * B * B).reshape(N, B, B)
    T = (1 - RESTART) * T
    T[:, :, 0] += RESTART
    A = np.transpose(T, (0, 2, 1)) - np.eye(B)  # (T^t - I) pi = 0, with sum(pi) = 1 replacing the last equation
    A[:, -1, :] = 1.0
    rhs = np.zeros((N, B))
    rhs[:, -1] = 1.0
    pi = np.linalg.solve(A, rhs[..., None])[..., 0]
    return pi @ reward + 1.0


def forward_tokens(block_size: int, num_levels: int) -> int:
    """Tokens per sequence in one static-shape TiDAR forward: B-1 drafts and a template of B masks per level."""
    return block_size - 1 + num_levels * block_size


def accelerator_cost(shape: ModelShape, hardware: str, context: int = 4096, batch: int = 1) -> CostFn:
    """Roofline forward time (`projection.forward_cost`) on a preset (mi300x, mi355x, h100)."""
    accel = ACCELERATORS[HARDWARE[hardware]]
    return lambda tokens: forward_cost(shape, accel, tokens, batch, context).time_s


def cpu_cost(lm, block_size: int, context: int = 64, repeats: int = 3) -> tuple[CostFn, dict]:
    """Forward time on this machine, measured: the median of `repeats` forwards of T new tokens over a KV cache of
    `context` tokens, for T = 1 and the widths of 1, B/2 and B templates; a least-squares line a + b*T in between.
    Returns (cost function, the measured points)."""
    from transformers import DynamicCache

    device = next(lm.parameters()).device
    vocab = lm.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (1, context), generator=gen).to(device)
    points = {}
    with torch.inference_mode():
        cache = DynamicCache(config=lm.config)
        lm(input_ids=prefix, past_key_values=cache, use_cache=True)
        for width in sorted({1, forward_tokens(block_size, 1), forward_tokens(block_size, max(1, block_size // 2)),
                             forward_tokens(block_size, block_size)}):
            new = torch.randint(0, vocab, (1, width), generator=gen).to(device)
            times = []
            for _ in range(repeats + 1):  # the first is a warm-up
                c = copy.deepcopy(cache)
                start = time.perf_counter()
                lm(input_ids=new, past_key_values=c, use_cache=True)
                times.append(time.perf_counter() - start)
            points[width] = float(np.median(times[1:]))
    xs, ys = np.array(list(points)), np.array(list(points.values()))
    slope, intercept = np.polyfit(xs, ys, 1)
    slope, intercept = max(float(slope), 0.0), max(float(intercept), 1e-9)
    return (lambda tokens: intercept + slope * tokens), {"context": context, "seconds": points,
                                                        "fit": {"intercept": intercept, "slope": slope}}


def _entry(levels: tuple[int, ...], tpf: float, cost: CostFn, block_size: int) -> dict:
    tokens = forward_tokens(block_size, len(levels))
    return {"levels": list(levels), "tokens_per_forward": float(tpf), "forward_tokens": tokens,
            "speedup": float(tpf / cost(tokens) * cost(1))}


def choose_levels(histogram: Sequence[float], block_size: int, costs: dict[str, CostFn]) -> dict:
    """Per cost model (hardware name -> CostFn): the best level set, with "all" and Zyphra's (scaled) levels priced
    the same way. `histogram`: accepted drafts over forwards that verified a full block (B-1 drafts)."""
    law = acceptance_law(histogram, block_size)
    best = best_level_sets(law)
    zyphra = zyphra_levels(block_size)
    zyphra_tpf = None if zyphra is None else float(chain_tpf(law, np.isin(np.arange(block_size), zyphra)[None])[0])
    out = {}
    for name, cost in costs.items():
        candidates = [_entry(levels, tpf, cost, block_size) for levels, tpf in best.values()]
        report = {"chosen": max(candidates, key=lambda e: e["speedup"]), "all": _entry(*best[block_size], cost,
                                                                                       block_size)}
        if zyphra is not None:
            report["zyphra"] = _entry(zyphra, zyphra_tpf, cost, block_size)
        out[name] = report
    return out


def measured_histogram(full_draft: Sequence[int] | None, overall: Sequence[int], block_size: int) -> list[int]:
    """The histogram to model: accepted drafts over forwards with a full block when there are any, else every
    forward's (which mixes in the first step's zero drafts, so it is pessimistic)."""
    if full_draft is not None and sum(full_draft) > 0:
        return list(full_draft)
    return list(overall[:block_size])


def phase_end_levels(samplers: dict, statistics: dict, shape: ModelShape, block_size: int, context: int) -> dict:
    """{TiDAR sampler: choose_levels(...)} on the accelerator presets at batch 1, from the decode-temperature
    histograms of the phase-end check (`decode_statistics` output for the full-draft histograms)."""
    costs = {hw: accelerator_cost(shape, hw, context) for hw, name in HARDWARE.items() if name is not None}
    out = {}
    for name, s in samplers.items():
        if s["kind"] == "ar":
            continue
        full = statistics["samplers"].get(name, {}).get("full_draft_histogram")
        out[name] = choose_levels(measured_histogram(full, s["acceptance_histogram"], block_size), block_size, costs)
    return out


def histogram_from_eval(eval_json, sampler: str, block_size: int, temperature: float) -> list[int] | None:
    """The acceptance histogram of `sampler` ("lossless", "mixing_0.5", ...) from an eval.json measured at this
    block size; the full-draft histogram at `temperature` when recorded. None when the file does not hold one."""

    result = json.loads(Path(eval_json).read_text())
    if result.get("settings", {}).get("block_size") != block_size or sampler not in result.get("samplers", {}):
        return None
    stats = result.get("statistics", {}).get(f"temperature_{temperature:g}", {}).get("samplers", {}).get(sampler, {})
    return measured_histogram(stats.get("full_draft_histogram"), result["samplers"][sampler]["acceptance_histogram"],
                              block_size)


def resolve_auto_levels(model, prompts, cfg, hardware: str, eval_json=None, batch: int = 1,
                        context: int = 4096) -> dict:
    """`--levels auto`: the histogram from `eval_json` (when it holds one for this sampler and block size) or from a
    calibration decode of `prompts` with every level, the cost model of `hardware`, and `choose_levels`' report
    for it (plus where the histogram came from and, on cpu, the timed points)."""

    if hardware not in HARDWARE:
        raise ValueError(f"--hardware {hardware!r} must be one of {sorted(HARDWARE)}")
    B = model.block_size if cfg.block_size is None else cfg.block_size
    name = "lossless" if cfg.sampler == "lossless" else f"mixing_{float(cfg.mix_weight):g}"
    histogram = histogram_from_eval(eval_json, name, B, cfg.temperature) if eval_json else None
    source = str(eval_json)
    if histogram is None:
        calibration = decode_tidar(model, prompts, replace(cfg, levels="all"))
        overall = _counts([a for r in calibration for a in r.accepted], B)
        histogram = measured_histogram(full_draft_histogram(calibration, B - 1), overall, B)
        source = f"calibration decode of {len(prompts)} prompts with every level"
    if hardware == "cpu":
        cost, timing = cpu_cost(model.lm, B)
    else:
        cost, timing = accelerator_cost(model_shape(model.lm), hardware, context, batch), None
    report = choose_levels(histogram, B, {hardware: cost})[hardware]
    return {"hardware": hardware, "source": source, "histogram": histogram, **report,
            **({"cpu_timing": timing} if timing else {})}


def _counts(values: Sequence[int], size: int) -> list[int]:
    out = [0] * size
    for v in values:
        out[min(v, size - 1)] += 1
    return out
