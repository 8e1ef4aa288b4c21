"""A run folder that explains itself: where it is, how to resume it, and what it was run with.

- `announce(run_dir, overrides)`: the start-up lines: the run folder and the exact command that resumes it (the same
  overrides with `run_dir=` pinned: the trainer resumes from the newest complete checkpoint in that folder).
- `write_run_record(run_dir, cfg, overrides)`: `config.yaml` (the resolved, typed config: every value the phase
  used, defaults included) and `overrides.yaml` (what was given on the command line or by the pipeline).
- `sweep_job_dirname(job_overrides, argv)`: a --multirun job's folder, named by the overrides that vary in the
  sweep (e.g. `objective.alpha=0.5`), so job folders say what they are.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from omegaconf import OmegaConf

from ar2diff.fs import write_text_atomic

CONFIG_NAME, OVERRIDES_NAME = "config.yaml", "overrides.yaml"


def resume_command(overrides: list[str], run_dir: str | Path) -> str:
    """`python -m ar2diff.train <overrides> run_dir=<absolute run folder>`."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "run_dir"]
    args = [*kept, f"run_dir={Path(run_dir).resolve()}"]
    return "python -m ar2diff.train " + " ".join(shlex.quote(a) for a in args)


def announce(run_dir: str | Path, overrides: list[str], world_size: int = 1) -> None:
    """Print (call on rank 0) the run folder and how to resume or re-run it."""
    print(f"[ar2diff] run folder: {Path(run_dir).resolve()}", flush=True)
    launcher = "" if world_size == 1 else f" (launched as now: torchrun ... {world_size} ranks ... -m ar2diff.train ...)"
    print(f"[ar2diff] resume / re-run with{launcher}:\n  {resume_command(overrides, run_dir)}", flush=True)


def write_run_record(run_dir: str | Path, cfg, overrides: list[str]) -> None:
    """config.yaml (resolved) and overrides.yaml in `run_dir`; call on rank 0."""
    run_dir = Path(run_dir)
    for name, text in ((CONFIG_NAME, OmegaConf.to_yaml(OmegaConf.structured(cfg))),
                       (OVERRIDES_NAME, OmegaConf.to_yaml(OmegaConf.create(list(overrides))))):
        path = run_dir / name
        if not (path.is_file() and path.read_text() == text):  # a re-run of the same command leaves it untouched
            write_text_atomic(path, text)


def sweep_job_dirname(job_overrides: list[str], argv: list[str] | None = None, job_num: int = 0) -> str:
    """This job's values of the keys swept on the command line (`a=1,2`, `range(...)`, ...), joined by ','."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = [a for a in (sys.argv[1:] if argv is None else argv) if "=" in a and not a.startswith("-")]
    swept = {o.key_or_group for o in OverridesParser.create().parse_overrides(given) if o.is_sweep_override()}
    name = ",".join(o for o in job_overrides if o.split("=", 1)[0].lstrip("+~") in swept) or f"job{job_num}"
    return name.replace("/", "_")
