"""The tables and the plot of docs/reference-run.md, from a finished (or running) `recipe=reference_smollm2` run.

Reads every phase folder of RUN: the light checks of the intermediate exports (`exports/step_*/light_eval.json`)
and the phase-end panel (`eval.json`), and writes

- the curve: greedy lossless tokens per forward (with its interval over prompts), wall-clock speed-up over AR in
  the same process and the held-out losses against conversion tokens (all phases counted together), as a table
  and as `reference_curve.png`;
- per phase end: each sampler at T=0 and T=1 (TPF with interval, TPF outside repeated 4-grams, tokens/s, speed-up
  and agreement with AR), the teacher-forced agreement by draft offset, the held-out AR loss against the base
  (paired interval) in domain, on chat and out of domain, and pass@k.

    python scripts/reference_report.py RUN --out RUN/reference_report.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the pipeline's run folder (holds 0_tidar_midtrain/, 1_diffusion_sft/)")
    p.add_argument("--out", default=None, help="markdown file (default: RUN/reference_report.md)")
    p.add_argument("--plot", default=None, help="PNG of the curve (default: RUN/reference_curve.png)")
    return p


def phase_dirs(run: Path) -> list[Path]:
    return sorted((p for p in run.iterdir() if p.is_dir() and p.name[:1].isdigit() and "_" in p.name),
                  key=lambda p: int(p.name.split("_", 1)[0]))


def curve_rows(run: Path) -> list[dict]:
    """One row per light check and per phase end, in training order, with the tokens of earlier phases added."""
    rows, before = [], 0
    for phase in phase_dirs(run):
        for light in sorted(phase.glob("exports/step_*/light_eval.json")):
            r = json.loads(light.read_text())
            g = r["greedy"]
            rows.append({"phase": phase.name, "step": r["step"], "tokens": before + (r["tokens_seen"] or 0),
                         "tpf": g["tokens_per_forward"]["tokens_per_forward"], "low": g["tokens_per_forward"]["low"],
                         "high": g["tokens_per_forward"]["high"], "prompts": g["prompts"],
                         "speedup": g["speedup_wall"], "loss_ar": r["heldout"]["loss_ar"],
                         "loss_diff": r["heldout"]["loss_diff"], "kind": "light"})
        summary = phase / "summary.json"
        tokens = json.loads(summary.read_text()).get("tokens_seen", 0) if summary.is_file() else 0
        if (phase / "eval.json").is_file():
            ev = json.loads((phase / "eval.json").read_text())
            tpf = ev["statistics"]["temperature_0"]["samplers"]["lossless"]["tpf"]
            s = ev["samplers"]["lossless"]
            rows.append({"phase": phase.name, "step": ev["step"], "tokens": before + tokens,
                         "tpf": tpf["tokens_per_forward"], "low": tpf["low"], "high": tpf["high"],
                         "prompts": tpf["prompts"], "speedup": s["speedup_wall"],
                         "loss_ar": ev["heldout"]["loss_ar"], "loss_diff": ev["heldout"]["loss_diff"],
                         "kind": "phase end"})
        before += tokens
    return rows


def fmt_interval(v: float, low: float, high: float, digits: int = 3) -> str:
    return f"{v:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def curve_table(rows: list[dict]) -> list[str]:
    out = ["| phase | step | tokens | check | prompts | greedy lossless TPF [95 %] | speed-up vs AR | held-out AR loss | "
           "held-out diffusion loss |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['phase']} | {r['step']} | {r['tokens']:,} | {r['kind']} | {r['prompts']} | "
                   f"{fmt_interval(r['tpf'], r['low'], r['high'])} | {r['speedup']:.2f} | {r['loss_ar']:.3f} | "
                   f"{r['loss_diff']:.3f} |")
    return out


def panel(phase: Path) -> list[str]:
    ev = json.loads((phase / "eval.json").read_text())
    out = [f"### {phase.name} (step {ev['step']}, {ev['prompts']['count']} prompts x "
           f"{ev['settings']['max_new_tokens']} tokens, levels {ev['settings'].get('levels')}, check "
           f"{ev['eval_seconds'] / 60:.1f} min)", "",
           "| T | sampler | TPF [95 %] | TPF outside repeated 4-grams [95 %] | repeated share | tokens/s | "
           "vs AR | agrees with AR |", "|---|---|---|---|---|---|---|---|"]
    for temp, stats in ev["statistics"].items():
        t = temp.split("_", 1)[1]
        for name, s in stats["samplers"].items():
            tpf, rep = s["tpf"], s["repetition"]
            speed = ev["samplers"][name] if t == "0" else {}
            tokens_s = f"{speed['tokens_per_s']:.1f}" if speed else "-"
            vs = f"{speed['speedup_wall']:.2f}" if speed else "-"
            agree = f"{speed['agreement_tokens']:.3f}" if speed else "-"
            out.append(f"| {t} | {name} | {fmt_interval(tpf['tokens_per_forward'], tpf['low'], tpf['high'])} | "
                       f"{fmt_interval(rep['tokens_per_forward_outside_repeats'], rep['tokens_per_forward_outside_repeats_low'], rep['tokens_per_forward_outside_repeats_high'])} | "  # noqa: E501
                       f"{rep['repeated_share']:.2f} | {tokens_s} | {vs} | {agree} |")
    curve = ev.get("agreement_curve", {})
    if curve:
        out += ["", "Teacher-forced agreement by block offset 0-7 (held-out rows, drafted positions): "
                "P(draft argmax = AR argmax) " + ", ".join(f"{v:.3f}" for v in curve["argmax_agree"])
                + "; E[min(1, p/q)] " + ", ".join(f"{v:.3f}" for v in curve["expected_accept"]) + "."]
    out += ["", "| held-out set | rows | AR loss, this export | AR loss, base | paired difference [95 %] |",
            "|---|---|---|---|---|"]
    for name, s in ev.get("base_relative", {}).items():
        paired = s.get("paired_vs_base")
        if paired is None or "base" not in s["scores"]:
            continue
        out.append(f"| {name} | {s['rows']} | {s['scores']['end']['loss_ar']:.4f} | "
                   f"{s['scores']['base']['loss_ar']:.4f} | "
                   f"{fmt_interval(paired['loss_ar'], paired['low'], paired['high'], 4)} |")
    passk = ev.get("passk", {}).get("samplers", {})
    if passk:
        ks = [k for k in next(iter(passk.values())) if k.startswith("pass@")]
        out += ["", "| sampler | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks)]
        for name, s in passk.items():
            out.append(f"| {name} | " + " | ".join(fmt_interval(s[k]["value"], s[k]["low"], s[k]["high"], 2)
                                                  for k in ks) + " |")
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for kind, marker in (("light", "o"), ("phase end", "s")):
        sel = [r for r in rows if r["kind"] == kind]
        if not sel:
            continue
        x = [r["tokens"] / 1e3 for r in sel]
        a.errorbar(x, [r["tpf"] for r in sel], yerr=[[r["tpf"] - r["low"] for r in sel],
                                                      [r["high"] - r["tpf"] for r in sel]],
                   fmt=marker, capsize=3, label=f"{kind} ({sel[0]['prompts']} prompts)")
        b.plot(x, [r["speedup"] for r in sel], marker, label=kind)
    a.set(xlabel="conversion tokens (thousands)", ylabel="greedy lossless tokens / forward",
          title="drafter: tokens per forward")
    b.axhline(1.0, color="grey", lw=0.8)
    b.set(xlabel="conversion tokens (thousands)", ylabel="wall-clock speed-up over AR",
          title="same process, bf16, batch 1")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = Path(args.run)
    if not run.is_dir():
        raise SystemExit(f"{run} is not a folder")
    rows = curve_rows(run)
    lines = ["## The curve", "", *curve_table(rows), ""]
    for phase in phase_dirs(run):
        if (phase / "eval.json").is_file():
            lines += [*panel(phase), ""]
    out = Path(args.out) if args.out else run / "reference_report.md"
    out.write_text("\n".join(lines))
    if rows:
        plot(rows, Path(args.plot) if args.plot else run / "reference_curve.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
