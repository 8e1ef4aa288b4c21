"""`python -m ar2diff.evaluate --checkpoint EXPORT --tasks T1,T2 [--sampler lossless|ar|mixing --mix-weight W]`:
lm-eval-harness tasks on an ar2diff export, loglikelihood from the AR stream, generation through an ar2diff sampler,
tokens per forward beside each task's metrics (`ar2diff.evaluation.lm_eval_model`; `pip install ar2diff[lm_eval]`).

Writes the report as JSON to --output (default: <checkpoint>/lm_eval.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ar2diff.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="export folder (config.json, safetensors, tokenizer)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (or group names)")
    p.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAMLs (local tasks)")
    p.add_argument("--only-include-path", action="store_true",
                   help="index only --include-path's tasks, not lm-eval's built-in ones (faster start)")
    p.add_argument("--sampler", default="lossless", choices=("ar", "lossless", "mixing"))
    p.add_argument("--mix-weight", type=float, default=0.0, help="the mixing sampler's weight in (0, 1]")
    p.add_argument("--max-gen-toks", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--device", default=None, help="torch device (default: the accelerator if any, else cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="report JSON (default: <checkpoint>/lm_eval.json)")
    return p.parse_args(argv)


def format_table(report: dict) -> str:
    lines = [f"sampler {report['sampler']}" + (f" (mix weight {report['mix_weight']:g})" if report["mix_weight"]
                                               else "")]
    for task, r in report["tasks"].items():
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items() if isinstance(v, (int, float)))
        tpf = r["tokens_per_forward"]
        lines.append(f"{task}: {metrics}" + (f" | tokens/forward {tpf:.2f}" if tpf is not None else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    try:
        from ar2diff.evaluation.lm_eval_model import Ar2diffLM, run_tasks
    except ImportError as err:
        print(f"--tasks needs lm-eval-harness: pip install 'ar2diff[lm_eval]' ({err})", file=sys.stderr)
        return 2
    from ar2diff.decode.evaluate import default_device
    from ar2diff.logging import write_json_atomic

    if not Path(args.checkpoint).is_dir():
        print(f"--checkpoint {args.checkpoint!r} is not a folder", file=sys.stderr)
        return 2
    device = torch.device(args.device) if args.device else default_device()
    lm = Ar2diffLM.from_export(args.checkpoint, dtype=getattr(torch, args.dtype), device=device,
                               sampler=args.sampler, mix_weight=args.mix_weight, max_gen_toks=args.max_gen_toks,
                               seed=args.seed)
    report = run_tasks(lm, [t for t in args.tasks.split(",") if t], include_path=args.include_path,
                       limit=args.limit, num_fewshot=args.num_fewshot,
                       include_defaults=not args.only_include_path)
    report["checkpoint"] = str(args.checkpoint)
    output = Path(args.output) if args.output else Path(args.checkpoint) / "lm_eval.json"
    write_json_atomic(output, json.loads(json.dumps(report, default=str)))
    print(format_table(report))
    print(f"report: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
