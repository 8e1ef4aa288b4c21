"""Router load of an exported MoE checkpoint on held-out text: per layer, from the classes the routers choose.

Routes the first --tokens tokens of --rows held-out standard-library files (the default corpus' held-out split)
through the model and prints, per layer, the max/min expert load (multiples of the uniform share), their ratio,
the entropy of the load (1 = uniform) and, for ZAYA, the skip share (`ar2diff.model.router_balance`).

    python scripts/router_load.py outputs/quickstart/<ts>/ar_pretrain/export --out router_load.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import stdlib_prompts  # noqa: E402  (a sibling script, not a package)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from ar2diff.model import load_model
    from ar2diff.model.router_balance import LoadRecorder, load_metrics

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="exported checkpoint folder")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)
    lm = load_model(args.checkpoint, dtype=torch.float32).eval()
    rows = stdlib_prompts(AutoTokenizer.from_pretrained(args.checkpoint), args.rows, args.tokens)
    recorder = LoadRecorder(lm, training_only=False)
    if not recorder.routers:
        raise SystemExit(f"{args.checkpoint}: no MoE router found")
    with torch.no_grad():
        for row in rows:
            lm(input_ids=torch.tensor([row]), use_cache=False)
    counts = recorder.take("cpu")
    layers = {f"layer{i}": load_metrics(counts[i], m.num_experts, hasattr(m, "balancing_biases"))
              for i, (_, m) in enumerate(recorder.routers)}
    print(f"{args.checkpoint}: {args.rows} held-out rows x {args.tokens} tokens")
    print(f"{'layer':<8} {'max_load':>8} {'min_load':>8} {'ratio':>8} {'entropy':>8} {'skip':>6}")
    for name, m in layers.items():
        print(f"{name:<8} {m['max_load']:>8.2f} {m['min_load']:>8.3f} {m['load_ratio']:>8.1f} "
              f"{m['load_entropy']:>8.3f} {m.get('skip_share', 0.0):>6.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"checkpoint": args.checkpoint, "layers": layers}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
