"""`python -m ar2diff.train recipe=NAME [overrides]`: one phase, or a pipeline of phases, from a Hydra recipe.

A pipeline (recipe with `pipeline:`) runs its phases in order; each phase is composed as
`recipe=<phase recipe> <phase overrides> <your overrides>` and starts from the previous phase's export.
Outputs: `outputs/<recipe>/<timestamp>/` (or `run_dir=`), one folder per phase with `export/`, `summary.json`
and `eval.json`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ar2diff.config.compose import compose, to_phase_config
from ar2diff.config.schema import PhaseConfig
from ar2diff.logging import write_json_atomic

log = logging.getLogger("ar2diff.train")


def default_run_dir(name: str) -> Path:
    """outputs/<name>/<timestamp>, chosen on rank 0 and shared with every rank."""
    import torch.distributed as dist

    from ar2diff.trainer.distributed import init_distributed

    init_distributed()
    stamp = [time.strftime("%Y-%m-%d_%H-%M-%S")]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(stamp, src=0)
    return Path("outputs") / name / stamp[0]


def phase_callbacks(cfg: PhaseConfig) -> list:
    if cfg.objective.kind == "tidar" and cfg.decoder.enabled:
        from ar2diff.decode.evaluate import phase_end_eval

        return [phase_end_eval]
    return []


def run_phase(cfg: PhaseConfig, run_dir: Path, group: str | None = None):
    from ar2diff.trainer.loop import train_phase

    return train_phase(cfg, run_dir, group=group or cfg.logger.group, callbacks=phase_callbacks(cfg))


def plan_pipeline(cfg: PhaseConfig, user_overrides: list[str], run_dir: Path) -> list[tuple[PhaseConfig, Path]]:
    """Every phase composed and validated up front: (config, phase folder); phase i starts from phase i-1's export."""
    from ar2diff.trainer.distributed import init_distributed

    base = next((o.split("=", 1)[1] for o in user_overrides if o.startswith("model.path=")), None)
    passthrough = [o for o in user_overrides
                   if o.split("=", 1)[0].lstrip("+~") not in ("recipe", "run_dir")
                   and not o.lstrip("+~").startswith("inputs.")]
    plan, previous = [], None
    for i, phase in enumerate(cfg.pipeline):
        if phase.skip_if_base and base is not None:
            continue
        overrides = [f"recipe={phase.recipe}", *phase.overrides, *passthrough]
        if previous is not None:
            overrides.append(f"model.path={previous}")
        try:
            phase_cfg = compose(overrides).validate(init_distributed().world_size)
        except ValueError as err:
            raise ValueError(f"pipeline phase {i} ({phase.recipe}): {err}") from None
        phase_dir = run_dir / f"{i}_{phase_cfg.phase}"
        plan.append((phase_cfg, phase_dir))
        previous = phase_dir / "export"
    return plan


def run_pipeline(cfg: PhaseConfig, user_overrides: list[str], run_dir: Path) -> list:
    """Run the phases in order, after checking every phase's inputs; a phase already complete is not redone."""
    from ar2diff.preflight import check_phase_inputs, phase_complete
    from ar2diff.trainer.loop import PhaseResult

    plan = plan_pipeline(cfg, user_overrides, run_dir)
    for i, (phase_cfg, phase_dir) in enumerate(plan):
        if i > 0:  # later phases start from an export that does not exist yet
            phase_cfg = replace(phase_cfg, model=replace(phase_cfg.model, path=None))
        check_phase_inputs(phase_cfg, f"pipeline phase {phase_dir.name}: ")
    group = cfg.logger.group or f"{cfg.name}-{run_dir.name}"
    results = []
    for phase_cfg, phase_dir in plan:
        if phase_complete(phase_dir, phase_cfg):
            log.warning("phase %s is complete (export, summary, eval): not redone", phase_dir)
            summary = json.loads((phase_dir / "summary.json").read_text())
            results.append(PhaseResult(run_dir=phase_dir, export_dir=phase_dir / "export", summary=summary))
            continue
        results.append(run_phase(phase_cfg, phase_dir, group=group))
    write_json_atomic(run_dir / "pipeline.json", {
        "recipe": cfg.name, "group": group,
        "phases": [{"phase": r.summary.get("phase"), "run_dir": str(r.run_dir), "export_dir": str(r.export_dir)}
                   for r in results]})
    return results


def run(cfg: PhaseConfig, overrides: list[str] = ()) -> list:
    """Run a phase or a pipeline from a composed config (what `python -m ar2diff.train` does)."""
    from ar2diff.trainer.distributed import init_distributed

    from ar2diff.trainer.run_lock import lock_run_dir

    ctx = init_distributed()
    cfg.validate(ctx.world_size)  # fail before any work; each phase validates its own config too
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg.name)
    lock = lock_run_dir(run_dir, ctx.rank)  # a second job on this run folder stops here, on every rank
    try:
        if cfg.pipeline:
            return run_pipeline(cfg, list(overrides), run_dir)
        from ar2diff.preflight import check_phase_inputs

        check_phase_inputs(cfg)
        return [run_phase(cfg, run_dir)]
    finally:
        lock.release()


_SWEEP_DIRS: dict[str, str] = {}  # the jobs of a --multirun sweep run in this process and share its folder


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(dict_cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ar2diff").setLevel(logging.INFO)
    from ar2diff.cli_errors import USER_ERRORS, report
    from ar2diff.trainer.faults import Preempted

    hydra_cfg = HydraConfig.get()
    try:
        cfg = to_phase_config(dict_cfg)
        if hydra_cfg.mode.name == "MULTIRUN":  # one folder per sweep, one subfolder per job
            base = cfg.run_dir or _SWEEP_DIRS.setdefault(cfg.name, str(default_run_dir(cfg.name)))
            cfg.run_dir = f"{base}/{hydra_cfg.job.num}"
        run(cfg, list(hydra_cfg.overrides.task))
    except Preempted as stopped:  # the checkpoint is written: exit 0 so a scheduler's requeue resumes
        logging.getLogger("ar2diff").warning("%s", stopped)
        sys.exit(0)
    except USER_ERRORS as err:  # one line, once (rank 0), no traceback
        sys.exit(report("ar2diff.train", err))


if __name__ == "__main__":
    main()
