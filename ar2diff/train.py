"""`python -m ar2diff.train recipe=NAME [overrides]`: one phase, or a pipeline of phases, from a Hydra recipe.

A pipeline (recipe with `pipeline:`) runs its phases in order; each phase is composed as
`recipe=<phase recipe> <phase overrides> <your overrides>` and starts from the previous phase's export.
Outputs: `outputs/<recipe>/<timestamp>/` (or `run_dir=`), one folder per phase with `export/`, `summary.json`
and `eval.json`; every run (and pipeline phase) folder holds `config.yaml` (resolved) and `overrides.yaml`. The
start-up lines name the run folder and the command that resumes it. `--multirun` sweeps put one folder per job,
named by its swept overrides, next to Hydra's `multirun.yaml`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ar2diff.fs import write_json_atomic
from ar2diff.config.compose import compose, to_phase_config
from ar2diff.config.paths import CONF_DIR, RECIPES_DIR, search_path_override, user_search_path
from ar2diff.config.schema import PhaseConfig
from ar2diff.run_folder import announce, sweep_job_dirname, write_run_record
import torch.distributed as dist
from ar2diff.trainer.distributed import init_distributed
from ar2diff.trainer.phase import PhaseTrainer
from ar2diff.preflight import check_phase_inputs, phase_complete
from ar2diff.trainer.phase import PhaseResult
from ar2diff.evaluation.report import write_pipeline_quality
from ar2diff.trainer.run_lock import lock_run_dir
from ar2diff.cli_errors import USER_ERRORS, disk_full_anywhere, report
from ar2diff.logging import configure_cli_logging
from ar2diff.trainer.faults import Preempted
from ar2diff.cli_errors import hydra_errors_in_one_line

# hydra.sweep.dir in conf/config.yaml: run_dir= when given, else a new folder under outputs/<name>/
OmegaConf.register_new_resolver("ar2diff_or", lambda value, default: default if value is None else value,
                                replace=True)
# --help: the built-in recipes (Hydra lists only the groups of conf/ itself)
OmegaConf.register_new_resolver(
    "ar2diff_recipes", lambda: ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))), replace=True)

log = logging.getLogger("ar2diff.train")


def default_run_dir(name: str) -> Path:
    """outputs/<name>/<timestamp>, chosen on rank 0 and shared with every rank."""
    init_distributed()
    stamp = [time.strftime("%Y-%m-%d_%H-%M-%S")]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(stamp, src=0)
    return Path("outputs") / name / stamp[0]


def _on_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def run_phase(cfg: PhaseConfig, run_dir: Path, group: str | None = None, callbacks: list = (),
              overrides: list[str] | None = None, reference_data=None):
    """Train one phase with the built-in callbacks (+ `callbacks`); the decoder check for a TiDAR phase.
    `overrides` (when given) are recorded with the resolved config in the phase folder. reference_data: the
    pipeline's fixed pretraining held-out set for base-relative quality (None: the phase's own)."""
    if overrides is not None and _on_rank0():
        write_run_record(run_dir, cfg, overrides)
    decoder_check = cfg.objective.kind == "tidar" and cfg.decoder.enabled
    return PhaseTrainer(cfg, run_dir, group=group or cfg.logger.group, callbacks=list(callbacks),
                        decoder_check=decoder_check, reference_data=reference_data).run()


def plan_pipeline(cfg: PhaseConfig, user_overrides: list[str], run_dir: Path) -> list[tuple[PhaseConfig, Path]]:
    """Every phase composed and validated up front: (config, phase folder); phase i starts from phase i-1's export."""
    base = next((o.split("=", 1)[1] for o in user_overrides if o.startswith("model.path=")), None)
    passthrough = [o for o in user_overrides
                   if o.split("=", 1)[0].lstrip("+~") not in ("recipe", "run_dir")
                   and not o.lstrip("+~").startswith("inputs.")]
    plan, previous = [], None
    for i, phase in enumerate(cfg.pipeline):
        if phase.skip_if_base and base is not None:
            continue
        shared = cfg.pipeline_overrides if phase.shared else []
        overrides = [f"recipe={phase.recipe}", *shared, *phase.overrides, *passthrough]
        if previous is not None:
            overrides.append(f"model.path={previous}")
        try:
            phase_cfg = compose(overrides).validate(init_distributed().world_size)
        except ValueError as err:
            raise ValueError(f"pipeline phase {i} ({phase.recipe}): {err}") from None
        phase_dir = run_dir / f"{i}_{phase_cfg.phase}"
        plan.append((phase_cfg, phase_dir, overrides))
        previous = phase_dir / "export"
    return plan


def run_pipeline(cfg: PhaseConfig, user_overrides: list[str], run_dir: Path) -> list:
    """Run the phases in order, after checking every phase's inputs; a phase already complete is not redone."""

    plan = plan_pipeline(cfg, user_overrides, run_dir)
    for i, (phase_cfg, phase_dir, _) in enumerate(plan):
        if i > 0:  # later phases start from an export that does not exist yet
            phase_cfg = replace(phase_cfg, model=replace(phase_cfg.model, path=None))
        check_phase_inputs(phase_cfg, f"pipeline phase {phase_dir.name}: ")
    group = cfg.logger.group or f"{cfg.name}-{run_dir.name}"
    # one fixed pretraining held-out set for every phase's base-relative quality (the first non-chat phase's data)
    reference = next((phase_cfg.data for phase_cfg, _, _ in plan if not phase_cfg.data.chat), None)
    results = []
    for phase_cfg, phase_dir, overrides in plan:
        if phase_complete(phase_dir, phase_cfg):
            log.warning("phase %s is complete (export, summary, eval): not redone", phase_dir)
            summary = json.loads((phase_dir / "summary.json").read_text())
            results.append(PhaseResult(run_dir=phase_dir, export_dir=phase_dir / "export", summary=summary))
            continue
        results.append(run_phase(phase_cfg, phase_dir, group=group, overrides=overrides, reference_data=reference))
    write_json_atomic(run_dir / "pipeline.json", {
        "recipe": cfg.name, "group": group,
        "phases": [{"phase": r.summary.get("phase"), "run_dir": str(r.run_dir), "export_dir": str(r.export_dir)}
                   for r in results]})

    if init_distributed().rank == 0:  # base -> midtrain -> context extension -> SFT: pipeline_quality.{json,md,png}
        write_pipeline_quality(run_dir, [r.run_dir for r in results])
    return results


def run(cfg: PhaseConfig, overrides: list[str] = (), resume_overrides: list[str] | None = None) -> list:
    """Run a phase or a pipeline from a composed config (what `python -m ar2diff.train` does). The start-up lines
    print the resume command with `resume_overrides` (default: `overrides`)."""
    ctx = init_distributed()
    cfg.validate(ctx.world_size)  # fail before any work; each phase validates its own config too
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg.name)
    lock = lock_run_dir(run_dir, ctx.rank)  # a second job on this run folder stops here, on every rank
    try:
        if _on_rank0():
            announce(run_dir, list(overrides if resume_overrides is None else resume_overrides), ctx.world_size)
        if cfg.pipeline:
            if _on_rank0():
                write_run_record(run_dir, cfg, list(overrides))
            return run_pipeline(cfg, list(overrides), run_dir)

        check_phase_inputs(cfg)
        return [run_phase(cfg, run_dir, overrides=list(overrides))]
    finally:
        lock.release()


NO_RECIPE = """python -m ar2diff.train needs a recipe (or overrides saying what to train); nothing was started.
  python -m ar2diff.train recipe=quickstart            # the whole pipeline at toy scale, on any CPU (~6 min)
  python -m ar2diff.train recipe=tidar_midtrain model.path=/ckpt/ZAYA1-8B data.sources.0.path='/data/*.jsonl'
  python -m ar2diff.train --help                       # recipes, config groups and the main knobs"""


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(dict_cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig


    configure_cli_logging()  # also: a log file on a full disk (W&B's debug.log) prints nothing

    hydra_cfg = HydraConfig.get()
    task = list(hydra_cfg.overrides.task)
    if not task:
        raise SystemExit(NO_RECIPE)
    cfg = None
    try:
        cfg = to_phase_config(dict_cfg)
        if hydra_cfg.mode.name == "MULTIRUN":  # the sweep folder (run_dir= or a new one) holds multirun.yaml + jobs
            cfg.run_dir = str(Path(hydra_cfg.sweep.dir) / sweep_job_dirname(task, job_num=hydra_cfg.job.num))
        run(cfg, task, resume_overrides=[*user_search_path(list(hydra_cfg.overrides.hydra)), *task])
    except Preempted as stopped:  # the checkpoint is written: exit 0 so a scheduler's requeue resumes
        logging.getLogger("ar2diff").warning("%s", stopped)
        sys.exit(0)
    except USER_ERRORS as err:  # one line, once (rank 0), no traceback
        sys.exit(report("ar2diff.train", err))
    except OSError as err:  # a full disk outside a checkpoint save (run record, exports, logs): one line too
        sys.exit(report("ar2diff.train", disk_full_anywhere(err, cfg.run_dir if cfg else None)))


# Hydra's flags that take a value as the next argument (`--cfg job`, `-cn NAME`…); `--info` takes one optionally
VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
               "-cd", "--experimental-rerun", "--info", "-i"}


def split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra's flags with their values, the overrides): a flag's value stays with its flag, so `--cfg job` keeps
    working when the overrides are moved behind the flags."""
    flags, overrides, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            flags.append(arg)
            takes_value = arg in VALUE_FLAGS and i + 1 < len(args)
            if takes_value and not args[i + 1].startswith("-") and "=" not in args[i + 1]:
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides


def main() -> None:
    """The command line: Hydra's, with the built-in recipes/ on the search path (after any user folders)."""
    flags, overrides = split_flags(sys.argv[1:])
    sys.argv[1:] = flags + search_path_override(overrides)

    with hydra_errors_in_one_line("ar2diff.train"):  # an unknown key, a bad option, a malformed override
        hydra_main()


if __name__ == "__main__":
    main()
