"""`python -m ar2diff.train recipe=NAME [overrides]`: one phase, or a pipeline of phases, from a Hydra recipe.

A pipeline (recipe with `pipeline:`) runs its phases in order; each phase is composed as
`recipe=<phase recipe> <phase overrides> <your overrides>` and starts from the previous phase's export.
Outputs: `outputs/<recipe>/<timestamp>/` (or `run_dir=`), one folder per phase with `export/`, `summary.json`
and `eval.json`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ar2diff.config.compose import compose, to_phase_config
from ar2diff.config.schema import PhaseConfig
from ar2diff.logging import write_json_atomic


def default_run_dir(name: str) -> Path:
    """outputs/<name>/<timestamp>, chosen on rank 0 and shared with every rank."""
    import torch.distributed as dist

    from ar2diff.trainer.distributed import init_distributed

    init_distributed()
    stamp = [time.strftime("%Y-%m-%d_%H-%M-%S")]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(stamp, src=0)
    return Path("outputs") / name / stamp[0]


def phase_callbacks(cfg: PhaseConfig, reference_data=None) -> list:
    if cfg.objective.kind == "tidar" and cfg.decoder.enabled:
        from functools import partial

        from ar2diff.decode.evaluate import phase_end_eval

        return [partial(phase_end_eval, reference_data=reference_data)]
    return []


def run_phase(cfg: PhaseConfig, run_dir: Path, group: str | None = None, reference_data=None):
    """reference_data: the pipeline's fixed pretraining held-out set for base-relative quality (None: own)."""
    from ar2diff.trainer.loop import train_phase

    return train_phase(cfg, run_dir, group=group or cfg.logger.group,
                       callbacks=phase_callbacks(cfg, reference_data))


def run_pipeline(cfg: PhaseConfig, user_overrides: list[str], run_dir: Path) -> list:
    """Run the phases in order; each one starts from the previous phase's exported checkpoint."""
    base = next((o.split("=", 1)[1] for o in user_overrides if o.startswith("model.path=")), None)
    passthrough = [o for o in user_overrides
                   if o.split("=", 1)[0].lstrip("+~") not in ("recipe", "run_dir")
                   and not o.lstrip("+~").startswith("inputs.")]
    group = cfg.logger.group or f"{cfg.name}-{run_dir.name}"
    results, previous, reference = [], None, None
    for i, phase in enumerate(cfg.pipeline):
        if phase.skip_if_base and base is not None:
            continue
        overrides = [f"recipe={phase.recipe}", *phase.overrides, *passthrough]
        if previous is not None:
            overrides.append(f"model.path={previous}")
        phase_cfg = compose(overrides)
        if reference is None and not phase_cfg.data.chat:  # one fixed pretraining held-out set for every phase
            reference = phase_cfg.data
        result = run_phase(phase_cfg, run_dir / f"{i}_{phase_cfg.phase}", group=group, reference_data=reference)
        results.append(result)
        previous = result.export_dir
    write_json_atomic(run_dir / "pipeline.json", {
        "recipe": cfg.name, "group": group,
        "phases": [{"phase": r.summary.get("phase"), "run_dir": str(r.run_dir), "export_dir": str(r.export_dir)}
                   for r in results]})
    from ar2diff.evaluation.report import write_pipeline_quality
    from ar2diff.trainer.distributed import init_distributed

    if init_distributed().rank == 0:  # base -> midtrain -> context extension -> SFT: pipeline_quality.{json,md,png}
        write_pipeline_quality(run_dir, [r.run_dir for r in results])
    return results


def run(cfg: PhaseConfig, overrides: list[str] = ()) -> list:
    """Run a phase or a pipeline from a composed config (what `python -m ar2diff.train` does)."""
    from ar2diff.trainer.distributed import init_distributed

    cfg.validate(init_distributed().world_size)  # fail before any work; each phase validates its own config too
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg.name)
    if cfg.pipeline:
        return run_pipeline(cfg, list(overrides), run_dir)
    return [run_phase(cfg, run_dir)]


_SWEEP_DIRS: dict[str, str] = {}  # the jobs of a --multirun sweep run in this process and share its folder


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(dict_cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ar2diff").setLevel(logging.INFO)
    hydra_cfg = HydraConfig.get()
    cfg = to_phase_config(dict_cfg)
    if hydra_cfg.mode.name == "MULTIRUN":  # one folder per sweep, one subfolder per job
        base = cfg.run_dir or _SWEEP_DIRS.setdefault(cfg.name, str(default_run_dir(cfg.name)))
        cfg.run_dir = f"{base}/{hydra_cfg.job.num}"
    run(cfg, list(hydra_cfg.overrides.task))


if __name__ == "__main__":
    main()
