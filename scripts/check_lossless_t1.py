"""Lossless sampling at temperature 1 is the AR distribution, on a real checkpoint: a chi-square test.

For each prompt, --samples TiDAR lossless decodes of three tokens at T=1. The first token comes from the AR head of
the first forward; the second is the first one a draft decides (drafted by that forward, verified by the next: kept
with probability min(1, p/q), else resampled from the residual). Their empirical joint distribution is compared with
the exact AR probabilities p(x1) p(x2 | x1), computed by the plain transformers model, over every pair whose expected
count is at least --min-expected plus one "other" bin. A control sampler that keeps every draft (x2 ~ q) must fail
the same test: if it passes, the test has no power on that prompt (drafter and AR agree too well) and says so.

    python scripts/check_lossless_t1.py RUN/1_diffusion_sft/export --prompts 2 --samples 1500 --out chi2.json

Prompts: --prompt-len-token windows past the heads of held-out stdlib files (seed --seed; see router_load.py), the
first --prompts of them whose exact pair distribution fills at least --min-bins bins.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from router_load import middle_windows  # noqa: E402  (a sibling script, not a package)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="exported checkpoint folder")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--samples", type=int, default=1500, help="decodes per prompt and sampler")
    p.add_argument("--levels", default="1,2", help="'all' or the acceptance levels to draft")
    p.add_argument("--min-expected", type=float, default=5.0, help="pairs expected fewer times are pooled")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-fraction", type=float, default=0.02)
    p.add_argument("--min-bins", type=int, default=6,
                   help="use only prompts whose exact pair distribution fills at least this many bins (a prompt "
                        "whose first tokens are nearly certain cannot tell the samplers apart)")
    p.add_argument("--candidates", type=int, default=200, help="windows to look through for such prompts")
    p.add_argument("--out", default="check_lossless_t1.json")
    return p


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int, float]:
    """(Pearson statistic, degrees of freedom, p-value) of counts against probabilities over the same bins."""
    expected = probs * counts.sum()
    keep = expected > 0
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    df = int(keep.sum()) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                            torch.tensor(stat / 2, dtype=torch.float64)))
    return stat, df, p_value


def exact_pairs(lm, prompt: list[int], samples: int, min_expected: float):
    """({(x1, x2): p}, other): every pair with samples * p >= min_expected, and the probability of all the rest."""
    device = lm.device
    with torch.no_grad():
        p1 = torch.softmax(lm(torch.tensor([prompt], device=device)).logits[0, -1].double(), -1).cpu()
        pairs = {}
        for x1 in torch.nonzero(p1 * samples >= min_expected).flatten().tolist():
            p2 = torch.softmax(lm(torch.tensor([prompt + [x1]], device=device)).logits[0, -1].double(), -1).cpu()
            joint = p1[x1] * p2
            for x2 in torch.nonzero(joint * samples >= min_expected).flatten().tolist():
                pairs[(x1, x2)] = float(joint[x2])
    return pairs, max(0.0, 1.0 - sum(pairs.values()))


def accept_every_draft(p_KV, draft_q_KV, drafts_K, gen):
    """The control: keep every draft, then sample the bonus token from p (what a sampler without the test does)."""
    from ar2diff.decode.samplers import sample

    k = int(drafts_K.numel())
    return k, int(sample(p_KV[k:k + 1], gen)[0])


def run_sampler(model, prompt, cfg, samples: int, control: bool) -> tuple[list[tuple[int, int]], int]:
    """(the first two tokens of each sample, samples whose draft of x2 was kept)."""
    from ar2diff.decode.tidar import decode_tidar

    patch = mock.patch("ar2diff.decode.tidar.verify_lossless", accept_every_draft) if control else nullcontext()
    with patch:
        results = decode_tidar(model, [prompt] * samples, cfg)
    if any(r.drafts[1:2] != [1] for r in results):
        raise SystemExit("the second forward did not verify exactly one draft: is the block size >= 2?")
    return [(r.token_ids[0], r.token_ids[1]) for r in results], sum(r.accepted[1] >= 1 for r in results)


def check_prompt(model, prompt, cfg, samples: int, min_expected: float, control: bool) -> dict:
    pairs, other = exact_pairs(model.lm, prompt, samples, min_expected)
    start = time.perf_counter()
    drawn, kept = run_sampler(model, prompt, cfg, samples, control)
    keys = list(pairs)
    index = {k: i for i, k in enumerate(keys)}
    counts = torch.zeros(len(keys) + 1, dtype=torch.float64)
    for pair in drawn:
        counts[index.get(pair, len(keys))] += 1
    probs = torch.tensor([*pairs.values(), other], dtype=torch.float64)
    stat, df, p_value = chi_square(counts, probs)
    return {"bins": len(keys) + 1, "other_probability": other, "draft_kept": kept / samples, "chi_square": stat,
            "df": df, "p_value": p_value, "seconds": time.perf_counter() - start}


def spread_prompts(lm, candidates: list[list[int]], n: int, samples: int, min_expected: float,
                   min_bins: int) -> list[list[int]]:
    """The first `n` candidates whose exact (x1, x2) distribution has at least `min_bins` bins at this sample size
    (pairs expected `min_expected` times or more, plus "other"): prompts where the test can have power."""
    chosen = [c for c in candidates if len(exact_pairs(lm, c, samples, min_expected)[0]) + 1 >= min_bins][:n]
    if len(chosen) < n:
        raise SystemExit(f"only {len(chosen)} of {len(candidates)} windows have >= {min_bins} bins at {samples} "
                         "samples; raise --candidates or --samples, or lower --min-bins")
    return chosen


def main(argv: list[str] | None = None) -> int:
    from ar2diff.checkpoint.reader import load_export
    from ar2diff.decode.tidar import TidarConfig

    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    export = load_export(args.checkpoint, dtype=getattr(torch, args.dtype))
    model = export.tidar()
    prompts = spread_prompts(model.lm, middle_windows(export.tokenizer, args.candidates, args.prompt_len,
                                                      args.heldout_fraction, args.seed),
                             args.prompts, args.samples, args.min_expected, args.min_bins)
    levels = "all" if args.levels == "all" else tuple(int(x) for x in args.levels.split(","))
    cfg = TidarConfig(max_new_tokens=3, temperature=1.0, levels=levels, sampler="lossless", seed=args.seed,
                      eos_token_id=None)
    rows = []
    for i, prompt in enumerate(prompts):
        row = {"prompt": i, "text": export.tokenizer.decode(prompt)}
        for name, control in (("lossless", False), ("accept_every_draft", True)):
            row[name] = check_prompt(model, prompt, cfg, args.samples, args.min_expected, control)
            r = row[name]
            print(f"prompt {i} {name:<19} chi2 {r['chi_square']:9.1f} df {r['df']:3d} p {r['p_value']:.3g} "
                  f"(draft of x2 kept {r['draft_kept']:.2f}, {r['bins']} bins, {r['seconds']:.0f} s)", flush=True)
        row["control_has_power"] = row["accept_every_draft"]["p_value"] < 0.001
        rows.append(row)
    passed = all(r["lossless"]["p_value"] >= 0.001 for r in rows)
    powered = [r["control_has_power"] for r in rows]
    print(f"lossless at T=1: {'consistent with' if passed else 'REJECTED against'} the AR distribution at the 0.1% "
          f"level on {len(rows)} prompts; the accept-every-draft control was rejected on {sum(powered)} of them")
    Path(args.out).write_text(json.dumps({"checkpoint": str(args.checkpoint), "settings": vars(args),
                                          "threads": torch.get_num_threads(), "prompts": rows,
                                          "lossless_consistent": passed, "control_rejected": powered}, indent=2))
    print(f"wrote {args.out}")
    return 0 if passed and all(powered) else 1


if __name__ == "__main__":
    sys.exit(main())
