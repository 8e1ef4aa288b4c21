"""Is the phase-end TPF measurement reproducible across training seeds? Compares the decoder checks of two or more
pipeline runs of the same recipe (e.g. the quickstart with `seed=1 model.init_seed=1 data.seed=1`).

For every phase, temperature and sampler it prints each run's tokens-per-forward with its bootstrap interval
(`eval.json` -> statistics) and whether the intervals of all runs overlap; the same for the mixing - lossless
difference, for TPF outside repeated 4-grams (the drafter's speed on text that is not a loop), and for the
teacher-forced agreement means (argmax agreement and E[min(1, p/q)] over the drafted offsets, intervals over held-out
rows). Exit status 1 when any TPF interval pair is disjoint: the measurement would then tell the seeds apart, not the
samplers.

It also says whether the runs converted the same base checkpoint. A run that trains its own base (the quickstart
without `model.path`) gives each seed a different pretrained model, and the drafter's agreement follows the base; with
`model.path=BASE` the seeds vary only the conversion, as when converting a released checkpoint.

    python scripts/compare_seeds.py RUN_SEED0 RUN_SEED1 [--out compare.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path


def overlap(intervals: list[tuple[float, float]]) -> bool:
    """True when every pair of [low, high] intervals shares a point."""
    return max(low for low, _ in intervals) <= min(high for _, high in intervals)


def phase_evals(run: Path) -> dict[str, dict]:
    """{phase folder name: eval.json} of a pipeline run folder (phases without a decoder check left out)."""
    out = {p.parent.name: json.loads(p.read_text()) for p in sorted(run.glob("*/eval.json"))}
    if not out:
        raise SystemExit(f"{run}: no <phase>/eval.json (is it a pipeline run folder with the decoder check on?)")
    return out


def base_checkpoint(evals: dict[str, dict]) -> Path | None:
    """The checkpoint a run's first TiDAR phase converted (`quality_base` of its first eval.json), if recorded."""
    base = next((e.get("quality_base") for e in evals.values() if e.get("quality_base")), None)
    return Path(base) if base else None


def weights_digest(folder: Path) -> str:
    """sha256 over a checkpoint folder's *.safetensors files, in name order."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def same_base(evals: list[dict[str, dict]]) -> str:
    """Of the runs' `phase_evals`: 'same': one base folder; 'identical': equal weights in different folders;
    'different'; or 'unknown'."""
    bases = [base_checkpoint(e) for e in evals]
    if any(b is None for b in bases):
        return "unknown"
    if len({os.path.realpath(b) for b in bases}) == 1:
        return "same"
    if not all(any(b.glob("*.safetensors")) for b in bases):
        return "unknown"
    return "identical" if len({weights_digest(b) for b in bases}) == 1 else "different"


def compare(evals: list[dict[str, dict]]) -> list[dict]:
    """One row per (phase, temperature, quantity) present in every run (`phase_evals` of each)."""
    rows = []
    for phase in sorted(set.intersection(*(set(e) for e in evals))):
        stats = [e[phase].get("statistics", {}) for e in evals]
        for temp in sorted(set.intersection(*(set(s) for s in stats))):
            for sampler in sorted(set.intersection(*(set(s[temp]["samplers"]) for s in stats)) - {"ar"}):
                tpf = [s[temp]["samplers"][sampler]["tpf"] for s in stats]
                rows.append(row(phase, temp, f"TPF {sampler}", [t["tokens_per_forward"] for t in tpf],
                                [(t["low"], t["high"]) for t in tpf]))
                rep = [s[temp]["samplers"][sampler].get("repetition", {}) for s in stats]
                # only where some run repeats (elsewhere the figure equals TPF)
                if all("tokens_per_forward_outside_repeats_low" in r for r in rep) and any(
                        r.get("repeated_share", 1) > 0 for r in rep):
                    key = "tokens_per_forward_outside_repeats"
                    rows.append(row(phase, temp, f"TPF outside repeats {sampler}", [r[key] for r in rep],
                                    [(r[f"{key}_low"], r[f"{key}_high"]) for r in rep]))
            for name in sorted(set.intersection(*(set(s[temp].get("mixing_minus_lossless", {})) for s in stats))):
                diff = [s[temp]["mixing_minus_lossless"][name] for s in stats]
                rows.append(row(phase, temp, f"{name} - lossless", [d["difference"] for d in diff],
                                [(d["low"], d["high"]) for d in diff]))
        curves = [e[phase].get("agreement_curve", {}) for e in evals]
        if all("mean_over_drafts_interval" in c for c in curves):
            for key in ("argmax_agree", "expected_accept"):
                rows.append(row(phase, "teacher-forced", f"agreement {key}",
                                [c["mean_over_drafts"][key] for c in curves],
                                [tuple(c["mean_over_drafts_interval"][key]) for c in curves]))
    return rows


def row(phase: str, temperature: str, quantity: str, values: list[float], intervals: list[tuple[float, float]]) -> dict:
    return {"phase": phase, "temperature": temperature, "quantity": quantity, "values": values,
            "intervals": intervals, "overlap": overlap(intervals)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="pipeline run folders (two or more)")
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    args = p.parse_args(argv)
    if len(args.runs) < 2:
        p.error("give at least two run folders")
    evals = [phase_evals(r) for r in args.runs]
    rows = compare(evals)
    base = same_base(evals)
    print({"same": "bases: one base checkpoint; the seeds vary only the conversion",
           "identical": "bases: identical weights; the seeds vary only the conversion",
           "different": "bases: different base checkpoints; the seeds vary the pretrained model too",
           "unknown": "bases: not recorded in eval.json"}[base])
    print("| phase | T | quantity | " + " | ".join(r.name for r in args.runs) + " | overlap |")
    print("|---|---|---|" + "---|" * len(args.runs) + "---|")
    for row in rows:
        cells = [f"{v:.2f} [{lo:.2f}, {hi:.2f}]" for v, (lo, hi) in zip(row["values"], row["intervals"])]
        print(f"| {row['phase']} | {row['temperature'].removeprefix('temperature_')} | {row['quantity']} | "
              + " | ".join(cells) + f" | {'yes' if row['overlap'] else 'NO'} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0 if all(r["overlap"] for r in rows if r["quantity"].startswith("TPF ")) else 1


if __name__ == "__main__":
    sys.exit(main())
