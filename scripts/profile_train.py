"""Where the TiDAR training step spends its time beyond 2x AR: a torch.profiler breakdown of one step of each.

For each model and sequence length, after a warm-up step of each objective, one AR step and one TiDAR step
(forward + backward + AdamW, the same as scripts/bench_train.py) run under torch.profiler. The table groups the
TiDAR-minus-2xAR excess by cause:

- mask:      building the attention mask from the layout records (aten comparisons / logical ops, the float
             conversion of the boolean mask);
- attention: scaled-dot-product attention forward and backward (over 2S positions for TiDAR: up to 4x AR's work
             when the dense mask makes SDPA compute every block, masked or not);
- loss:      the head matmul over the second stream and cross-entropy;
- other:     everything else (the linear layers, MoE routing, optimizer).

    python scripts/profile_train.py --seq-len 256 --batch 4
    python scripts/profile_train.py --seq-len 4096 --batch 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import load_tidar, time_step  # noqa: E402

from ar2diff.objective import TidarObjective  # noqa: E402

GROUPS = {
    "attention": ("scaled_dot_product", "_flash_attention", "_efficient_attention", "attention"),
    "mask": ("aten::eq", "aten::lt", "aten::bitwise_and", "aten::logical_and", "aten::__and__", "aten::__or__",
             "aten::bitwise_or", "aten::masked_fill", "aten::where", "aten::logical_not", "aten::bitwise_not"),
    "loss": ("cross_entropy", "log_softmax", "nll_loss", "_log_softmax"),
}


def group_of(name: str) -> str:
    for group, keys in GROUPS.items():
        if any(k in name for k in keys):
            return group
    return "other"


def profiled_step(forward, batch, opt, device) -> tuple[float, dict[str, float], list[tuple[str, float]]]:
    """(wall seconds, {group: self CPU seconds}, top 12 ops by self CPU seconds) of one step."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = time_step(forward, batch, opt, device)
    groups: dict[str, float] = {}
    ops = []
    for e in prof.key_averages():
        seconds = e.self_cpu_time_total / 1e6
        groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + seconds
        ops.append((e.key, seconds))
    ops.sort(key=lambda x: -x[1])
    return wall, groups, ops[:12]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=["tiny_zaya", "tiny_qwen3_moe"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="profile_train.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    report = []
    for spec in args.model:
        model, model_type = load_tidar(spec, args.block_size, args.device, torch.float32, args.seq_len)
        ids = torch.randint(0, model.mask_token_id, (args.batch, args.seq_len),
                            generator=torch.Generator().manual_seed(0)).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        objective = TidarObjective(model)
        forwards = {"ar": objective.forward_ar, "tidar": objective.forward}
        for fwd in forwards.values():
            time_step(fwd, {"input_ids": ids}, opt, device)
        rows = {name: profiled_step(fwd, {"input_ids": ids}, opt, device) for name, fwd in forwards.items()}
        (ar_wall, ar_groups, _), (ti_wall, ti_groups, ti_top) = rows["ar"], rows["tidar"]
        excess = {g: ti_groups.get(g, 0.0) - 2 * ar_groups.get(g, 0.0) for g in set(ar_groups) | set(ti_groups)}
        print(f"== {spec} ({model_type}) B={args.batch} S={args.seq_len}: AR {ar_wall:.3f} s, TiDAR {ti_wall:.3f} s, "
              f"ratio {ti_wall / ar_wall:.2f} (profiled step)")
        print(f"{'group':<10} {'AR s':>8} {'TiDAR s':>8} {'TiDAR - 2 AR':>13}")
        for g in sorted(excess, key=lambda g: -excess[g]):
            print(f"{g:<10} {ar_groups.get(g, 0.0):>8.3f} {ti_groups.get(g, 0.0):>8.3f} {excess[g]:>13.3f}")
        print("TiDAR top ops (self CPU s): " + "; ".join(f"{k} {v:.3f}" for k, v in ti_top[:8]))
        report.append({"model": spec, "batch": args.batch, "seq_len": args.seq_len, "ar_s": ar_wall,
                       "tidar_s": ti_wall, "groups_ar": ar_groups, "groups_tidar": ti_groups,
                       "excess_over_2x_ar": excess, "tidar_top_ops": ti_top})
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
