"""Figures and tables of the quality measurements: speedup vs pass@k per sampler (one phase), the base -> midtrain
-> context extension -> SFT loss trajectory (one pipeline), loss by position (context extension).

`pipeline_trajectory` is a pure function of the phases' eval.json dicts; `write_pipeline_quality` writes it as
pipeline_quality.json / .md / .png at the top of a pipeline run folder. PNGs are written with matplotlib's Agg
backend via a temporary name, like the acceptance histograms.
"""

from __future__ import annotations

import json
from pathlib import Path

from ar2diff.decode.plots import save_figure as _save
from ar2diff.fs import write_json_atomic


def _figure(size=(5.5, 3.6)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def save_speedup_vs_passk(passk: dict, path: str | Path) -> Path:
    """x: measured tokens per forward (the decoder check's), y: pass@k with its interval; one point per sampler
    (AR, lossless, each mixing weight), one panel per k. The trade-off a user picks a mixing weight from."""
    ks = passk["settings"]["ks"]
    fig = _figure((4.2 * len(ks), 3.6))
    for i, k in enumerate(ks):
        ax = fig.add_subplot(1, len(ks), i + 1)
        for name, s in passk["samplers"].items():
            p, x = s[f"pass@{k}"], passk["speed"][name]["tokens_per_forward"]
            ax.errorbar([x], [p["value"]], yerr=[[p["value"] - p["low"]], [p["high"] - p["value"]]], fmt="o",
                        capsize=3, label=name)
        ax.set_xlabel("tokens per forward (decoder check)")
        ax.set_ylabel(f"pass@{k}")
        ax.set_title(f"pass@{k}, T={passk['settings']['temperature']:g}, next {passk['settings']['target_len']} "
                     "tokens", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def save_position_loss(report: dict, path: str | Path) -> Path:
    """Held-out AR loss per position bucket, start vs end checkpoint; the previous seq_len marked."""
    b = [r for r in report["buckets"] if r["loss_start"] is not None]
    fig = _figure()
    ax = fig.add_subplot()
    xs = [max(r["start"], 0.5) for r in b]
    ax.plot(xs, [r["loss_start"] for r in b], "o-", label="start")
    ax.plot(xs, [r["loss_end"] for r in b], "o-", label="end")
    if report.get("previous_seq_len"):
        ax.axvline(report["previous_seq_len"], color="grey", ls="--", lw=1, label="previous seq_len")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position (bucket start)")
    ax.set_ylabel("held-out AR loss")
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def pipeline_trajectory(evals: list[dict]) -> dict:
    """Rows base -> each diffusion phase on the fixed pretraining held-out set (and the chat set where measured):
    AR / diffusion loss, delta vs the base, and the phase's pass@1 / pass@k per sampler."""
    rows, base = [], None
    for ev in evals:
        br = ev.get("base_relative", {})
        pre = br.get("pretrain")
        if pre is None:
            continue
        if base is None and "base" in pre["scores"]:
            base = pre["scores"]["base"]
            rows.append({"phase": "base", "checkpoint": ev.get("quality_base"), **_losses(base), "delta_ar": 0.0})
        end = pre["scores"]["end"]
        row = {"phase": ev.get("phase"), "checkpoint": ev.get("export_dir"), **_losses(end),
               "delta_ar": None if base is None else end["loss_ar"] - base["loss_ar"],
               "delta_ar_vs_start": pre.get("delta_vs_start", {}).get("loss_ar")}
        if "chat" in br:
            row["chat"] = {name: _losses(sc) for name, sc in br["chat"]["scores"].items()}
        passk = ev.get("passk")
        if passk:
            row["passk"] = {name: {k: s[k]["value"] for k in s if k.startswith("pass@")}
                            for name, s in passk["samplers"].items()}
        rows.append(row)
    return {"set": "pretrain held-out (fixed for every phase)", "rows": rows}


def _losses(scores: dict) -> dict:
    return {"loss_ar": scores["loss_ar"], "loss_diff": scores["loss_diff"]}


def _fmt(v) -> str:
    return "—" if v is None else f"{v:+.3f}" if isinstance(v, float) and v < 0 else f"{v:.3f}"


def trajectory_markdown(traj: dict) -> str:
    """The trajectory as a markdown table (what the README quotes)."""
    lines = ["| phase | AR loss | diffusion loss | Δ AR vs base | Δ AR vs start | pass@1 AR | pass@1 lossless |",
             "|---|---|---|---|---|---|---|"]
    for r in traj["rows"]:
        pk = r.get("passk", {})
        lines.append(f"| {r['phase']} | {_fmt(r['loss_ar'])} | {_fmt(r['loss_diff'])} | {_fmt(r.get('delta_ar'))} "
                     f"| {_fmt(r.get('delta_ar_vs_start'))} | {_fmt(pk.get('ar', {}).get('pass@1'))} "
                     f"| {_fmt(pk.get('lossless', {}).get('pass@1'))} |")
    return "\n".join(lines) + "\n"


def save_trajectory(traj: dict, path: str | Path) -> Path:
    """AR and diffusion held-out loss per phase (base first) on the fixed set."""
    rows = traj["rows"]
    fig = _figure()
    ax = fig.add_subplot()
    xs = range(len(rows))
    ax.plot(xs, [r["loss_ar"] for r in rows], "o-", label="AR loss")
    diff = [(i, r["loss_diff"]) for i, r in enumerate(rows) if r["loss_diff"] is not None]
    if diff:
        ax.plot(*zip(*diff), "s-", label="diffusion loss")
    ax.set_xticks(list(xs), [r["phase"] for r in rows], rotation=15, fontsize=8)
    ax.set_ylabel("held-out loss (fixed pretraining set)")
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def write_pipeline_quality(run_dir: str | Path, phase_dirs: list) -> dict | None:
    """Read each phase's eval.json, write pipeline_quality.{json,md,png} into run_dir; None when no phase has one."""
    evals = [json.loads((Path(d) / "eval.json").read_text()) for d in phase_dirs if (Path(d) / "eval.json").is_file()]
    traj = pipeline_trajectory(evals)
    if not traj["rows"]:
        return None
    run_dir = Path(run_dir)
    write_json_atomic(run_dir / "pipeline_quality.json", traj)
    (run_dir / "pipeline_quality.md").write_text(trajectory_markdown(traj))
    try:
        save_trajectory(traj, run_dir / "pipeline_quality.png")
    except ImportError:  # matplotlib is optional for the numbers
        pass
    return traj


def write_phase_plots(result: dict, folders) -> list[Path]:
    """speedup_vs_passk.png (and position_loss.png after context extension) into every folder."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    paths = []
    for folder in map(Path, folders):
        if "passk" in result:
            paths.append(save_speedup_vs_passk(result["passk"], folder / "speedup_vs_passk.png"))
        if "position_loss" in result:
            paths.append(save_position_loss(result["position_loss"], folder / "position_loss.png"))
    return paths
