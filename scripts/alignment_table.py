"""The drafter-verifier alignment sweep's table from its phase folders' eval.json files.

Each argument is `label=path` where path is a phase run folder (or an export folder) holding eval.json. Prints a
Markdown table: held-out AR / diffusion (data CE) loss, tokens per forward with 95% bootstrap intervals (greedy and
T=1), the teacher-forced agreement curve (P(diffusion argmax = AR argmax) and E[min(1, p/q)] per block offset),
mixing's NLL cost at T=1, and the share of accepted drafts inside repeated 4-grams. Writes the rows as JSON too.

    python scripts/alignment_table.py data=runs/data ar=runs/ar mix=runs/mix --out alignment.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def interval(stats: dict, temp: str, sampler: str) -> str:
    t = stats[temp]["samplers"][sampler]["tpf"]
    return f"{t['tokens_per_forward']:.2f} [{t['low']:.2f}, {t['high']:.2f}]"


def row(label: str, result: dict) -> dict:
    stats, curve, q = result["statistics"], result["agreement_curve"], result["quality"]
    temps = list(stats)
    mix = max((n for n in result["samplers"] if n.startswith("mixing_")), key=lambda n: float(n.split("_")[1]))
    d = stats[temps[0]]["mixing_minus_lossless"][mix]
    return {
        "target": label,
        "heldout_loss_ar": result["heldout"]["loss_ar"],
        "heldout_loss_diff": result["heldout"]["loss_diff"],
        "tpf_lossless_greedy": interval(stats, temps[0], "lossless"),
        f"tpf_{mix}_greedy": interval(stats, temps[0], mix),
        f"{mix}_minus_lossless_greedy": f"{d['difference']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]",
        "tpf_lossless_t1": interval(stats, temps[-1], "lossless"),
        f"tpf_{mix}_t1": interval(stats, temps[-1], mix),
        "argmax_agree_by_offset": " ".join(f"{v:.2f}" for v in curve["argmax_agree"]),
        "expected_accept_by_offset": " ".join(f"{v:.2f}" for v in curve["expected_accept"]),
        "expected_accept_mean_drafts": curve["mean_over_drafts"]["expected_accept"],
        f"nll_excess_{mix}_t1": q["nll_excess_over_ar"][mix],
        "nll_excess_lossless_t1": q["nll_excess_over_ar"]["lossless"],
        "accepted_in_repeats_lossless_greedy": stats[temps[0]]["samplers"]["lossless"]["repetition"][
            "accepted_in_repeats"],
        "notes": stats[temps[0]]["notes"] + stats[temps[-1]]["notes"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="label=folder with eval.json")
    p.add_argument("--out", default="alignment.json")
    args = p.parse_args(argv)
    rows = []
    for spec in args.runs:
        label, _, folder = spec.partition("=")
        path = Path(folder) / "eval.json"
        if not path.is_file():
            raise SystemExit(f"{spec}: {path} does not exist")
        rows.append(row(label, json.loads(path.read_text())))
    keys = [k for k in rows[0] if k != "notes"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    for r in rows:
        for note in r["notes"]:
            print(f"note ({r['target']}): {note}")
    Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
