"""What the decoder check writes: `eval.json` (atomically) and one acceptance-histogram PNG per TiDAR sampler into
each folder, the scalars it logs, and the subset that goes into summary.json."""

from __future__ import annotations

import math
from pathlib import Path

from ar2diff.decode.metrics import flat_statistics
from ar2diff.decode.plots import save_acceptance_histogram, save_router_load, save_statistics_figures
from ar2diff.evaluation.phase_quality import quality_metrics
from ar2diff.fs import write_json_atomic
from ar2diff.model.router_balance import flatten


def flat_metrics(result: dict) -> dict[str, float]:
    """The scalars to log (under the `eval/` prefix): held-out losses, per-sampler decode numbers, NLLs, projections."""
    h = result["heldout"]
    out = {f"heldout/{k}": h[k] for k in ("loss", "loss_ar", "loss_diff", "loss_aux", "tokens_ar", "tokens_diff")}
    for name, s in result["samplers"].items():
        for key in ("tokens_per_forward", "tokens_per_s", "speedup_wall", "agreement_tokens", "agreement_prompts"):
            out[f"{name}/{key}"] = s[key]
        for accel, p in s.get("projection", {}).items():
            out[f"{name}/projected_speedup/{accel.replace(' ', '_')}"] = p["speedup"]
    for name, v in result["quality"]["nll_per_token"].items():
        out[f"{name}/nll_t1"] = v
    out.update({f"router/{k}": v for k, v in flatten(result.get("router_load", {})).items()})
    for temp, stats in result.get("statistics", {}).items():
        out.update(flat_statistics(stats, temp))
    curve = result.get("agreement_curve", {})
    for key, value in curve.get("mean_over_drafts", {}).items():
        out[f"agreement_curve/{key}"] = value
    for key, (low, high) in curve.get("mean_over_drafts_interval", {}).items():
        out[f"agreement_curve/{key}_low"], out[f"agreement_curve/{key}_high"] = low, high
    for name, per_hw in result.get("levels_auto", {}).items():
        for hw, r in per_hw.items():
            for which, entry in r.items():
                out[f"{name}/levels_auto/{hw}/{which}_speedup"] = entry["speedup"]

    out.update(quality_metrics(result))
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def summary_subset(result: dict) -> dict:
    """What goes into summary.json under "eval": losses, and per sampler TPF, speedup, agreement, MI300X projection."""
    h, s = result["heldout"], result["samplers"]
    return {"loss_ar": h["loss_ar"], "loss_diff": h["loss_diff"],
            "tokens_per_forward": {k: v["tokens_per_forward"] for k, v in s.items()},
            "speedup_wall": {k: v["speedup_wall"] for k, v in s.items()},
            "agreement_tokens": {k: v["agreement_tokens"] for k, v in s.items()},
            "projected_speedup_MI300X": {k: v["projection"]["MI300X"]["speedup"] for k, v in s.items()
                                         if "projection" in v},
            "nll_excess_over_ar": result["quality"]["nll_excess_over_ar"],
            "tokens_per_forward_ci": {temp: {k: [v["tpf"]["low"], v["tpf"]["high"]] for k, v in st["samplers"].items()}
                                      for temp, st in result.get("statistics", {}).items()}}


def write_eval(result: dict, folders, logger=None, step: int = 0) -> list[Path]:
    """Write eval.json (atomic) and acceptance_<sampler>.png per TiDAR sampler into every folder; with a logger,
    log the scalars (prefix "eval"), the images of the first folder and the summary subset. Returns the json paths."""
    try:
        import matplotlib  # noqa: F401  (optional: pip install ar2diff[plot])
        plots = True
    except ImportError:
        plots = False
        if logger is not None:
            logger.print("[eval] matplotlib is not installed: no acceptance-histogram PNGs (pip install matplotlib)")
    paths, images = [], {}
    for folder in map(Path, folders):
        write_json_atomic(folder / "eval.json", result)
        paths.append(folder / "eval.json")
        for name, s in result["samplers"].items():
            if plots and s["kind"] != "ar":
                png = save_acceptance_histogram(s["acceptance_histogram"], folder / f"acceptance_{name}.png",
                                                title=f"{name}: {s['tokens_per_forward']:.2f} tokens/forward")
                images.setdefault(name, png)
        if plots and result.get("router_load"):
            images.setdefault("router_load", save_router_load(result["router_load"], folder / "router_load.png",
                                                              title="expert load of the routers' choices (held-out)"))
        if plots:  # TPF intervals and the teacher-forced agreement curve (ar2diff.decode.metrics / agreement)
            for name, png in save_statistics_figures(result, folder).items():
                images.setdefault(name, png)
    if logger is not None:
        logger.log(step, flat_metrics(result), prefix="eval")
        for name, png in images.items():
            logger.log_image(f"eval/acceptance/{name}" if name in result["samplers"] else f"eval/{name}", png, step)
        logger.update_summary({"eval": summary_subset(result)})
    return paths
