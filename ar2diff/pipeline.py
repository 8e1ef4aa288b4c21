"""Running what `python -m ar2diff.train` composed: one phase, or a pipeline of phases in order, each from the
previous phase's export. A phase already complete (export, summary, eval.json) is not redone."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from ar2diff.config.compose import compose
from ar2diff.config.schema import PhaseConfig
from ar2diff.evaluation.report import write_pipeline_quality
from ar2diff.fs import write_json_atomic
from ar2diff.preflight import check_phase_inputs, phase_complete
from ar2diff.run_folder import announce, write_run_record
from ar2diff.trainer.distributed import init_distributed
from ar2diff.trainer.faults import Preempted, process_stop
from ar2diff.trainer.phase import PhaseResult, PhaseTrainer
from ar2diff.trainer.run_lock import lock_run_dir

log = logging.getLogger("ar2diff.train")


def default_run_dir(name: str) -> Path:
    """outputs/<name>/<timestamp>, chosen on rank 0 and shared with every rank."""
    init_distributed()
    stamp = [time.strftime("%Y-%m-%d_%H-%M-%S")]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(stamp, src=0)
    return Path("outputs") / name / stamp[0]


def on_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def run_phase(cfg: PhaseConfig, run_dir: Path, group: str | None = None, callbacks: list = (),
              overrides: list[str] | None = None, reference_data=None):
    """Train one phase with the built-in callbacks (+ `callbacks`); the decoder check for a TiDAR phase.
    `overrides` (when given) are recorded with the resolved config in the phase folder. reference_data: the
    pipeline's fixed pretraining held-out set for base-relative quality (None: the phase's own)."""
    if overrides is not None and on_rank0():
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
        if process_stop().should_stop():  # a signal after the last phase's own checks: no next phase starts
            name = process_stop().name
            raise Preempted(0, name, f"stopped by {name} before phase {phase_dir.name}, which did not start; re-run "
                                     "the same command to continue")
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
    ctx = init_distributed(cfg.trainer.collective_timeout_minutes, cfg.trainer.rank0_timeout_minutes)
    cfg.validate(ctx.world_size)  # fail before any work; each phase validates its own config too
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg.name)
    lock = lock_run_dir(run_dir, ctx.rank)  # a second job on this run folder stops here, on every rank
    try:
        if on_rank0():
            announce(run_dir, list(overrides if resume_overrides is None else resume_overrides), ctx.world_size)
        if cfg.pipeline:
            if on_rank0():
                write_run_record(run_dir, cfg, list(overrides))
            return run_pipeline(cfg, list(overrides), run_dir)

        check_phase_inputs(cfg)
        return [run_phase(cfg, run_dir, overrides=list(overrides))]
    finally:
        lock.release()
