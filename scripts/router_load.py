"""Router load of an exported MoE checkpoint on held-out text: per layer, from the classes the routers choose.

Routes --rows windows of --tokens tokens of held-out standard-library files (the default corpus' held-out split)
through the model and prints, per layer, the max/min expert load (multiples of the uniform share), their ratio,
the entropy of the load (1 = uniform) and, for ZAYA, the skip share (`ar2diff.model.router_balance`).

Windows: `head` takes the first tokens of the first long-enough files in path order (licence headers and imports:
the least even routing). `middle` cuts every held-out file, past its first --tokens tokens, into non-overlapping
windows of --tokens tokens, shuffles them all with `random.Random(--seed)` and routes the first --rows.

`--loss-windows N` adds the held-out AR loss (mean ± standard error over windows) on the next N windows of the same
shuffled pool (never the routed ones). `--against CKPT` computes that loss for a second checkpoint on the same
windows and reports the paired difference (this checkpoint minus CKPT, ± standard error of the per-window
differences).

    python scripts/router_load.py outputs/quickstart/<ts>/0_ar_pretrain/export --out router_load.json
    python scripts/router_load.py RUN/export --windows middle --rows 48 --heldout-fraction 0.01 \\
        --loss-windows 64 --against OLD_RUN/export
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import DEFAULT_HELDOUT_FRACTION, stdlib_prompts  # noqa: E402  (a sibling script, not a package)


def middle_windows(tokenizer, n: int, length: int, fraction: float, seed: int) -> list[list[int]]:
    """The first `n` of all non-overlapping `length`-token windows past each held-out file's first `length` tokens,
    shuffled with `random.Random(seed)`."""
    from ar2diff.data.sources import in_heldout, read_stdlib_file, stdlib_files

    pool = []
    for rel in stdlib_files():
        if in_heldout(rel, fraction):
            text, _ = read_stdlib_file(rel)
            ids = tokenizer.encode(text, add_special_tokens=False) if text else []
            pool += [ids[start:start + length] for start in range(length, len(ids) - length + 1, length)]
    random.Random(seed).shuffle(pool)
    if len(pool) < n:
        raise SystemExit(f"the held-out stdlib files (fraction {fraction}) give {len(pool)} windows of {length} "
                         f"tokens past their heads; --rows + --loss-windows asks for {n}")
    return pool[:n]


def window_losses(lm, windows: list[list[int]]) -> list[float]:
    """The AR loss of each window (mean next-token cross-entropy), in eval mode."""
    out = []
    with torch.no_grad():
        for w in windows:
            x = torch.tensor([w])
            out.append(float(lm(input_ids=x, labels=x, use_cache=False).loss))
    return out


def mean_and_error(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std() / math.sqrt(len(t))) if len(t) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from ar2diff.model import load_model
    from ar2diff.model.router_balance import LoadRecorder, load_metrics

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="exported checkpoint folder")
    p.add_argument("--rows", type=int, default=16, help="windows routed")
    p.add_argument("--tokens", type=int, default=256, help="tokens per window")
    p.add_argument("--windows", choices=("head", "middle"), default="head",
                   help="file heads (path order) or shuffled non-overlapping windows past the heads")
    p.add_argument("--heldout-fraction", type=float, default=DEFAULT_HELDOUT_FRACTION,
                   help="files whose path hash is below this are held out (the default corpus' split)")
    p.add_argument("--seed", type=int, default=0, help="shuffle of the middle windows (routing and loss)")
    p.add_argument("--loss-windows", type=int, default=0, help="also the held-out AR loss on this many windows")
    p.add_argument("--against", default=None, help="a second checkpoint: paired loss difference on the same windows")
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)
    if args.against and not args.loss_windows:
        p.error("--against compares held-out losses: give --loss-windows N too")
    lm = load_model(args.checkpoint, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    if args.windows == "head":
        if args.heldout_fraction != DEFAULT_HELDOUT_FRACTION:
            p.error("--heldout-fraction applies to --windows middle and the loss windows only")
        rows = stdlib_prompts(tokenizer, args.rows, args.tokens)
    else:
        pool = middle_windows(tokenizer, args.rows + args.loss_windows, args.tokens, args.heldout_fraction, args.seed)
        rows = pool[:args.rows]
    recorder = LoadRecorder(lm, training_only=False)
    if not recorder.routers:
        raise SystemExit(f"{args.checkpoint}: no MoE router found")
    with torch.no_grad():
        for row in rows:
            lm(input_ids=torch.tensor([row]), use_cache=False)
    counts = recorder.take("cpu")
    recorder.remove()
    layers = {f"layer{i}": load_metrics(counts[i], m.num_experts, hasattr(m, "balancing_biases"))
              for i, (_, m) in enumerate(recorder.routers)}
    result = {"checkpoint": args.checkpoint, "windows": args.windows, "rows": args.rows, "tokens": args.tokens,
              "layers": layers,
              "worst": {"max_load": max(m["max_load"] for m in layers.values()),
                        "min_load": min(m["min_load"] for m in layers.values())}}
    print(f"{args.checkpoint}: {args.rows} held-out {args.windows} windows x {args.tokens} tokens")
    print(f"{'layer':<8} {'max_load':>8} {'min_load':>8} {'ratio':>8} {'entropy':>8} {'skip':>6}")
    for name, m in layers.items():
        print(f"{name:<8} {m['max_load']:>8.2f} {m['min_load']:>8.3f} {m['load_ratio']:>8.1f} "
              f"{m['load_entropy']:>8.3f} {m.get('skip_share', 0.0):>6.3f}")
    print(f"worst layer: max {result['worst']['max_load']:.2f}x, min {result['worst']['min_load']:.2f}x of uniform")
    if args.loss_windows:
        windows = (pool[args.rows:] if args.windows == "middle" else
                   middle_windows(tokenizer, args.rows + args.loss_windows, args.tokens, args.heldout_fraction,
                                  args.seed)[args.rows:])
        losses = window_losses(lm, windows)
        mean, err = mean_and_error(losses)
        result["heldout_loss"] = {"windows": len(windows), "mean": mean, "stderr": err}
        print(f"held-out AR loss {mean:.4f} ± {err:.4f} ({len(windows)} windows x {args.tokens})")
        if args.against:
            other = window_losses(load_model(args.against, dtype=torch.float32).eval(), windows)
            diff, derr = mean_and_error([a - b for a, b in zip(losses, other)])
            result["heldout_loss"]["against"] = {"checkpoint": args.against, "mean": mean_and_error(other)[0],
                                                 "paired_difference": diff, "stderr": derr}
            print(f"vs {args.against}: {diff:+.4f} ± {derr:.4f} (paired, this minus that)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
