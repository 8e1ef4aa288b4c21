"""Read finished runs for comparison (the logic behind `notebooks/compare_runs.ipynb`).

A phase folder holds `summary.json` (RunLogger.write_summary: "phase", "recipe", "history" = list of
{"step", "train/loss", ...}, "eval" subset, ...) and the decoder's `eval.json` (in the folder itself and in
`export/`). A pipeline folder holds `pipeline.json` listing its phase folders. `load_runs` takes any mix of both
and returns one `PhaseRun` per phase; `sampler_table` flattens their eval.json into rows for a table or a chart.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

RUN_DIRS_ENV = "AR2DIFF_RUN_DIRS"
TABLE_COLUMNS = ("run", "phase", "sampler", "tokens_per_forward", "speedup_wall", "agreement_tokens",
                 "nll_excess_over_ar", "projected_speedup_MI300X")


@dataclass
class PhaseRun:
    folder: Path
    label: str
    phase: str | None
    recipe: str | None
    summary: dict
    eval: dict | None = None
    history: list[dict] = field(default_factory=list)

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one logged key, e.g. "train/loss", in step order."""
        points = sorted((row["step"], row[key]) for row in self.history if key in row)
        return [s for s, _ in points], [v for _, v in points]


def run_dirs_from_env(default: list[str]) -> list[str]:
    """`AR2DIFF_RUN_DIRS` (os.pathsep-separated) if set, else `default`."""
    value = os.environ.get(RUN_DIRS_ENV, "")
    return [p for p in value.split(os.pathsep) if p] or list(default)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); was the run interrupted while writing it?") from None


def phase_dirs(folder: str | Path) -> list[Path]:
    """The phase folders of a run folder: itself (summary.json), the phases pipeline.json lists, or else its
    subfolders that hold a summary.json (a pipeline still running or interrupted)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"run folder {folder} does not exist")
    if (folder / "summary.json").is_file():
        return [folder]
    if (folder / "pipeline.json").is_file():
        out = []
        for entry in _read_json(folder / "pipeline.json")["phases"]:
            listed = Path(entry["run_dir"])  # as written, often relative to the launch directory
            out.append(listed if (listed / "summary.json").is_file() else folder / listed.name)
        return out
    subs = sorted(p for p in folder.iterdir() if (p / "summary.json").is_file())
    if not subs:
        raise FileNotFoundError(f"{folder} holds no summary.json, pipeline.json or phase subfolders: not a run folder "
                                "(point at outputs/<recipe>/<timestamp>)")
    return subs


def load_phase(folder: str | Path, label: str | None = None) -> PhaseRun:
    """One phase folder: summary.json (required) and eval.json (the folder's, else export/'s; None if neither)."""
    folder = Path(folder)
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} does not exist: the phase did not finish (or this is not a phase "
                                "folder)")
    summary = _read_json(summary_path)
    eval_path = next((p for p in (folder / "eval.json", folder / "export" / "eval.json") if p.is_file()), None)
    return PhaseRun(folder=folder, label=label or f"{folder.parent.name}/{folder.name}", phase=summary.get("phase"),
                    recipe=summary.get("recipe"), summary=summary, history=list(summary.get("history", [])),
                    eval=_read_json(eval_path) if eval_path else None)


def load_runs(folders) -> list[PhaseRun]:
    """Every phase of every run folder (phase or pipeline folders), in the order given."""
    runs = []
    for folder in map(Path, folders):
        for phase in phase_dirs(folder):
            label = f"{folder.name}/{phase.name}" if phase != folder else None
            runs.append(load_phase(phase, label))
    return runs


def sampler_table(runs: list[PhaseRun]) -> list[dict]:
    """One row per (phase run, sampler) with TABLE_COLUMNS; runs without eval.json are left out."""
    rows = []
    for run in runs:
        if run.eval is None:
            continue
        excess = run.eval.get("quality", {}).get("nll_excess_over_ar", {})
        for name, s in run.eval["samplers"].items():
            proj = s.get("projection", {}).get("MI300X", {})
            rows.append({"run": run.label, "phase": run.phase, "sampler": name,
                         "tokens_per_forward": s["tokens_per_forward"], "speedup_wall": s["speedup_wall"],
                         "agreement_tokens": s["agreement_tokens"], "nll_excess_over_ar": excess.get(name),
                         "projected_speedup_MI300X": proj.get("speedup")})
    return rows


def loss_table(runs: list[PhaseRun]) -> list[dict]:
    """One row per phase run: steps, last logged training losses and the held-out losses of eval.json."""
    rows = []
    for run in runs:
        last = next((row for row in reversed(run.history) if "train/loss" in row), {})
        held = (run.eval or {}).get("heldout", {})
        rows.append({"run": run.label, "phase": run.phase, "steps": run.summary.get("steps"),
                     "train_loss": last.get("train/loss"), "heldout_loss_ar": held.get("loss_ar"),
                     "heldout_loss_diff": held.get("loss_diff")})
    return rows


def format_table(rows: list[dict], columns=None, digits: int = 3) -> str:
    """A plain-text table (floats with `digits` decimals, None as '-'): what the notebook prints."""
    columns = list(columns or (rows[0].keys() if rows else []))

    def cell(v) -> str:
        return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)
