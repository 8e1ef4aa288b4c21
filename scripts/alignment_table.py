"""The drafter-verifier alignment sweep's table from its phase folders' eval.json files.

Each argument is `label=path` where path is a phase run folder (or an export folder) holding eval.json. Prints a
Markdown table: held-out AR / diffusion (data CE) loss, tokens per forward with 95% bootstrap intervals (greedy and
T=1), greedy lossless TPF outside repeated 4-grams, the teacher-forced agreement curve (P(diffusion argmax = AR
argmax) and E[min(1, p/q)] per block offset, and their means over the drafted offsets with intervals over held-out
rows), mixing's NLL cost at T=1, and the share of accepted drafts inside repeated 4-grams. Writes the rows as JSON
too. Label runs of several seeds e.g. `ar/s1=...`.

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


def mean_interval(curve: dict, key: str) -> str:
    """The agreement mean over drafts, with its interval over held-out rows where eval.json has one."""
    text = f"{curve['mean_over_drafts'][key]:.3f}"
    if "mean_over_drafts_interval" in curve:
        low, high = curve["mean_over_drafts_interval"][key]
        text += f" [{low:.3f}, {high:.3f}]"
    return text


def outside_repeats(repetition: dict) -> str:
    key = "tokens_per_forward_outside_repeats"
    text = f"{repetition[key]:.3f}"
    if f"{key}_low" in repetition:
        text += f" [{repetition[key + '_low']:.3f}, {repetition[key + '_high']:.3f}]"
    return text


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
        "argmax_agree_mean_drafts": mean_interval(curve, "argmax_agree"),
        "expected_accept_mean_drafts": mean_interval(curve, "expected_accept"),
        "tpf_outside_repeats_lossless_greedy": outside_repeats(stats[temps[0]]["samplers"]["lossless"]["repetition"]),
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
