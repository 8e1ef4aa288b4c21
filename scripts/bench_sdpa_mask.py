"""The SDPA mask forms of a TiDAR training step of a conf model on CPU: the boolean mask in one call (what ar2diff
passed two rounds ago), one additive float mask in one call, and the split SDPA (what it passes now).

SDPA converts a boolean mask to an additive one inside every call, so every layer makes its own (B, 1, 2S, 2S)
float copy and autograd keeps each for the backward; the additive form is built once and shared. The split form
(`ar2diff.model.split_attention`) builds only the pieces its calls use: clean x clean and the runs of draft queries
over the keys they can see. Each form runs in a fresh process (the peak RSS of a process only grows): warm-up
step, then --repeats timed steps (forward + backward + AdamW, as scripts/bench_train.py). Reports the peak RSS
above the pre-step baseline and the median step time, with the additive / boolean and split / additive ratios.

    python scripts/bench_sdpa_mask.py --model tiny_qwen3_moe --seq-len 4096 --batch 1
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

FORMS = ("boolean", "additive", "split")


def one_form(form: str, model_name: str, seq_len: int, batch: int, repeats: int, threads: int) -> dict:
    """Run in a child process: the step's peak RSS and median time with `form`."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train import load_tidar, time_step, with_draft_groups

    import ar2diff.model.tidar as tidar
    from ar2diff.model.attention import dense_mask
    from ar2diff.objective import TidarObjective

    torch.set_num_threads(threads)
    if form == "boolean":
        tidar.split_mask = lambda meta, S, dtype: dense_mask(meta)
    model, _ = load_tidar(model_name, 16, "cpu", torch.float32, seq_len)
    ids = torch.randint(0, model.mask_token_id, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    step = TidarObjective(model).forward
    if form == "additive":  # the additive mask in one dense call, as bench_train.py --compare-groups 0 times it
        step = with_draft_groups(step, 0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = [time_step(step, {"input_ids": ids}, opt, torch.device("cpu")) for _ in range(1 + repeats)][1:]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"form": form, "peak_bytes_above_start": peak - before, "median_s": statistics.median(times),
            "seconds": times, "layers": model.lm.config.num_hidden_layers}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny_qwen3_moe", help="a conf model name (see scripts/bench_train.py)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--child", choices=FORMS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(one_form(args.child, args.model, args.seq_len, args.batch, args.repeats, args.threads)))
        return 0
    rows = {}
    for form in FORMS:
        cmd = [sys.executable, __file__, "--child", form, "--model", args.model, "--seq-len", str(args.seq_len),
               "--batch", str(args.batch), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{form}: {proc.stderr[-2000:]}")
        rows[form] = json.loads(proc.stdout.strip().splitlines()[-1])
    a, b, sp = rows["additive"], rows["boolean"], rows["split"]
    result = {"model": args.model, "seq_len": args.seq_len, "batch": args.batch, "layers": a["layers"],
              "forms": rows, "peak_ratio_additive_over_boolean": a["peak_bytes_above_start"] /
              max(b["peak_bytes_above_start"], 1), "time_ratio_additive_over_boolean": a["median_s"] / b["median_s"],
              "peak_ratio_split_over_additive": sp["peak_bytes_above_start"] / max(a["peak_bytes_above_start"], 1),
              "time_ratio_split_over_additive": sp["median_s"] / a["median_s"]}
    print(f"{args.model} ({a['layers']} layers), {args.batch} x {args.seq_len}, TiDAR step on CPU:")
    for form, r in rows.items():
        print(f"  {form:<9} peak +{r['peak_bytes_above_start'] / 2**20:8.0f} MiB   median {r['median_s']:.3f} s")
    print(f"  additive / boolean: peak {result['peak_ratio_additive_over_boolean']:.2f}, "
          f"time {result['time_ratio_additive_over_boolean']:.2f}")
    print(f"  split / additive: peak {result['peak_ratio_split_over_additive']:.2f}, "
          f"time {result['time_ratio_split_over_additive']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
