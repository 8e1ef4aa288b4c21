"""`python -m ar2diff.train recipe=NAME [overrides]`: one phase, or a pipeline of phases, from a Hydra recipe.

A pipeline (recipe with `pipeline:`) runs its phases in order; each phase is composed as
`recipe=<phase recipe> <phase overrides> <your overrides>` and starts from the previous phase's export.
Outputs: `outputs/<recipe>/<timestamp>/` (or `run_dir=`), one folder per phase with `export/`, `summary.json`
and `eval.json`; every run (and pipeline phase) folder holds `config.yaml` (resolved) and `overrides.yaml`. The
start-up lines name the run folder and the command that resumes it. `--multirun` sweeps put one folder per job,
named by its swept overrides, next to Hydra's `multirun.yaml`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ar2diff.cli_errors import (
    USER_ERRORS,
    collective_failure,
    disk_full_anywhere,
    hydra_errors_in_one_line,
    one_line,
    report,
)
from ar2diff.config.compose import to_phase_config
from ar2diff.config.paths import CONF_DIR, RECIPES_DIR, search_path_override, user_search_path
from ar2diff.logging import configure_cli_logging
from ar2diff.run_folder import sweep_job_dirname
from ar2diff.trainer.faults import Preempted, StopRequested, leave_exit_word, process_stop

# hydra.sweep.dir in conf/config.yaml: run_dir= when given, else a new folder under outputs/<name>/
OmegaConf.register_new_resolver("ar2diff_or", lambda value, default: default if value is None else value,
                                replace=True)
# --help: the built-in recipes (Hydra lists only the groups of conf/ itself)
OmegaConf.register_new_resolver(
    "ar2diff_recipes", lambda: ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))), replace=True)

NO_RECIPE = """python -m ar2diff.train needs a recipe (or overrides saying what to train); nothing was started.
  python -m ar2diff.train recipe=quickstart            # the whole pipeline at toy scale, on any CPU (~6 min)
  python -m ar2diff.train recipe=tidar_midtrain model.path=/ckpt/ZAYA1-8B data.sources.0.path='/data/*.jsonl'
  python -m ar2diff.train --help                       # recipes, config groups and the main knobs"""


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(dict_cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from ar2diff.pipeline import run  # deferred: DeepSpeed is imported only when something runs

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
        leave_exit_word("stopped")
        logging.getLogger("ar2diff").warning("%s", stopped)
        sys.exit(0)
    except StopRequested as stopped:  # during set-up: nothing trained, nothing half-written
        exit_stopped_in_set_up(stopped)
    except USER_ERRORS as err:  # one line, once (rank 0), no traceback
        leave_exit_word("error")
        sys.exit(report("ar2diff.train", err))
    except OSError as err:  # a full disk outside a checkpoint save (run record, exports, logs): one line too
        leave_exit_word("error")
        sys.exit(report("ar2diff.train", disk_full_anywhere(err, cfg.run_dir if cfg else None)))
    except Exception as err:
        if (stopped := stop_within(err)) is not None:  # a library wrapped the stop (datasets' generation error)
            exit_stopped_in_set_up(stopped)
        lost = collective_failure(err, cfg)  # a peer died or hung: which one (the peers that left no exit word)
        if process_stop().received is not None and not (lost is not None and lost.silent):
            # stopping, and every peer ended on purpose: a peer that stopped first broke a collective
            leave_exit_word("stopped")
            logging.getLogger("ar2diff").warning("stopped by %s (%s); re-run the same command to resume",
                                                 process_stop().name, one_line(err)[:200])
            exit_now(0)  # the peer is gone: a clean teardown would wait on it
        if lost is not None:  # said on every rank (the launcher's stop signal after a death is not "stopped")
            leave_exit_word("error")
            exit_now(report("ar2diff.train", lost, rank=0))
        raise


def exit_stopped_in_set_up(stopped: StopRequested) -> None:
    leave_exit_word("stopped")
    logging.getLogger("ar2diff").warning("%s during set-up: nothing was trained; re-run the same command to start",
                                         stopped)
    sys.exit(0)


def stop_within(err: BaseException) -> StopRequested | None:
    """The StopRequested an exception was raised from, if any (its __cause__/__context__ chain)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, StopRequested):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def exit_now(code: int) -> None:
    """Exit without tearing down the process groups: that teardown waits on a peer that is dead or hung."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
    process_stop().install()  # a stop signal is honoured from here to exit (exit 0, nothing half-written)
    flags, overrides = split_flags(sys.argv[1:])
    sys.argv[1:] = flags + search_path_override(overrides)

    with hydra_errors_in_one_line("ar2diff.train"):  # an unknown key, a bad option, a malformed override
        hydra_main()


if __name__ == "__main__":
    main()
