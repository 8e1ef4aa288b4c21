"""Figures of decoder and training results (matplotlib, imported lazily; files are written with the Agg backend).

`save_acceptance_histogram` is what the phase-end check writes next to eval.json; `plot_loss_curves` and
`plot_tokens_per_forward` draw the run comparison of `notebooks/compare_runs.ipynb` from `ar2diff.analysis`
records onto axes the caller owns (so a notebook shows them inline).
"""

from __future__ import annotations

from pathlib import Path

from ar2diff.fs import atomic_path


def save_acceptance_histogram(histogram: list[int], path: str | Path, title: str = "") -> Path:
    """A bar chart of forwards per number of accepted drafts, saved as PNG at `path` (written via a temporary
    name and renamed, like eval.json). Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(5, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(histogram)), histogram, color="tab:blue")
    ax.set_xlabel("drafts accepted per forward")
    ax.set_ylabel("forwards")
    ax.set_xticks(range(len(histogram)))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def plot_loss_curves(runs, axes=None, keys=("train/loss", "train/loss_ar", "train/loss_diff")):
    """One panel per loss key, one line per phase run (label: run name / phase). Returns the axes."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
        axes = axes[0]
    for ax, key in zip(axes, keys):
        for run in runs:
            steps, values = run.curve(key)
            if steps:
                ax.plot(steps, values, label=run.label, marker="." if len(steps) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    return axes


def plot_tokens_per_forward(rows: list[dict], ax=None, value: str = "tokens_per_forward"):
    """Grouped bars: one group per phase run, one bar per sampler, from `ar2diff.analysis.sampler_table` rows."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.5))
    runs = list(dict.fromkeys(r["run"] for r in rows))
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    width = 0.8 / max(len(samplers), 1)
    for j, sampler in enumerate(samplers):
        xs, ys = [], []
        for i, run in enumerate(runs):
            match = [r[value] for r in rows if r["run"] == run and r["sampler"] == sampler]
            if match:
                xs.append(i + j * width)
                ys.append(match[0])
        ax.bar(xs, ys, width, label=sampler)
    ax.set_xticks([i + width * (len(samplers) - 1) / 2 for i in range(len(runs))], runs, rotation=15, fontsize=8)
    ax.set_ylabel(value)
    ax.legend(fontsize=8)
    return ax


def plot_acceptance(runs, axes=None):
    """Per phase run, the share of forwards that accepted n drafts, one line per TiDAR sampler. Returns the axes."""
    import matplotlib.pyplot as plt

    runs = [r for r in runs if r.eval is not None]
    if axes is None:
        _, axes = plt.subplots(1, max(len(runs), 1), figsize=(4.5 * max(len(runs), 1), 3.2), squeeze=False)
        axes = axes[0]
    for ax, run in zip(axes, runs):
        for name, s in run.eval["samplers"].items():
            hist = s["acceptance_histogram"]
            if s.get("kind") == "ar" or not sum(hist):
                continue
            ax.plot(range(len(hist)), [c / sum(hist) for c in hist], marker="o", label=name)
        ax.set_title(run.label, fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("drafts accepted per forward")
        ax.set_ylabel("share of forwards")
        ax.legend(fontsize=8)
    return axes


def save_router_load(per_layer: dict[str, dict[str, float]], path: str | Path, title: str = "") -> Path:
    """Per layer, the most and least loaded expert (multiples of the uniform share; 0.5x-2x shaded) and the skip
    share (ZAYA), as PNG at `path` (temporary name, then renamed). Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = list(per_layer)
    x = range(len(layers))
    fig = Figure(figsize=(max(5, 0.35 * len(layers) + 2), 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.axhspan(0.5, 2.0, color="tab:green", alpha=0.1, label="0.5x-2x uniform")
    ax.plot(x, [per_layer[k].get("max_load", 0.0) for k in layers], "v-", color="tab:red", label="max expert load")
    ax.plot(x, [per_layer[k].get("min_load", 0.0) for k in layers], "^-", color="tab:blue", label="min expert load")
    if any("skip_share" in m for m in per_layer.values()):
        ax.bar(x, [per_layer[k].get("skip_share", 0.0) for k in layers], color="tab:gray", alpha=0.5,
               label="skip share")
    ax.set_xticks(list(x))
    ax.set_xticklabels([k.replace("layer", "") for k in layers], fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel("load / uniform")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Write `fig` as PNG at `path` through a temporary name (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, format="png", dpi=100)
    tmp.replace(path)
    return path


def save_statistics_figures(result: dict, folder: str | Path) -> dict[str, Path]:
    """The phase-end statistics as PNGs in `folder`: tokens_per_forward_ci.png (TPF with its bootstrap interval
    per sampler and temperature) and agreement_curve.png (teacher-forced agreement per block offset). Returns
    {name: path} for the figures whose data the result holds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder, out = Path(folder), {}
    stats = result.get("statistics")
    if stats:
        fig = Figure(figsize=(6, 3.4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        width = 0.8 / len(stats)
        for k, (temp, st) in enumerate(stats.items()):
            names = list(st["samplers"])
            tpf = [st["samplers"][n]["tpf"] for n in names]
            xs = [i + k * width for i in range(len(names))]
            ax.bar(xs, [t["tokens_per_forward"] for t in tpf], width, label=temp.replace("_", " "),
                   yerr=[[t["tokens_per_forward"] - t["low"] for t in tpf], [t["high"] - t["tokens_per_forward"]
                                                                              for t in tpf]], capsize=3)
            ax.set_xticks([i + width * (len(stats) - 1) / 2 for i in range(len(names))], names, fontsize=8)
        ax.set_ylabel("tokens per forward (95% CI)")
        ax.legend(fontsize=8)
        out["tokens_per_forward_ci"] = save_figure(fig, folder / "tokens_per_forward_ci.png")
    curve = result.get("agreement_curve")
    if curve:
        fig = Figure(figsize=(5, 3.2))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        offsets = range(curve["block_size"])
        for key, label in (("argmax_agree", "P(diff argmax = AR argmax)"), ("expected_accept", "E[min(1, p/q)]"),
                           ("data_hit", "P(diff argmax = data)")):
            ax.plot(offsets, curve[key], marker="o", label=label)
        ax.set_xlabel("block offset (1 = first verified draft)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        out["agreement_curve"] = save_figure(fig, folder / "agreement_curve.png")
    return out
