"""`python -m ar2diff.evaluate --checkpoint EXPORT`: the phase-end check on any export, without retraining.

    python -m ar2diff.evaluate --checkpoint RUN/export                       # the run's own held-out data
    python -m ar2diff.evaluate --checkpoint DIR data.sources.0.path=x.jsonl  # any export, any data (overrides)

The configuration is the run's `resolved_config.json` next to the export (`RUN/export` -> `RUN/`) when there is
one, else the defaults; `KEY=VALUE` overrides (Hydra syntax) go on top, so the held-out split is the one the run
trained beside. The result is the phase-end check's `eval.json` (decode/evaluate.py `phase_end_eval`), written
into `--out` (default: the export folder). `--tasks` is reserved for task evaluation (lm-eval-harness), which
plugs in through `run_tasks`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

PROG = "python -m ar2diff.evaluate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="an exported checkpoint folder (python -m ar2diff.export)")
    p.add_argument("--config", default=None, help="a resolved_config.json (default: the one beside the export)")
    p.add_argument("--out", default=None, help="folder for eval.json and plots (default: the export folder)")
    p.add_argument("--tasks", default=None, help="comma-separated evaluation tasks (reserved: lm-eval-harness)")
    p.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE, e.g. data.heldout_fraction=0.1")
    return p


def load_config(checkpoint: Path, config: str | None, overrides: list[str]):
    """The PhaseConfig to evaluate with: the run's saved config (or the defaults), then `overrides`."""
    from omegaconf import OmegaConf

    from ar2diff.config.compose import compose, to_phase_config
    from ar2diff.trainer.resume_config import CONFIG_NAME

    saved = Path(config) if config else checkpoint.resolve().parent / CONFIG_NAME
    if config and not saved.is_file():
        raise FileNotFoundError(f"--config {config} does not exist")
    if not saved.is_file():
        return compose(list(overrides))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"override {bad[0]!r} is not KEY=VALUE")
    merged = OmegaConf.merge(OmegaConf.create(json.loads(saved.read_text())), OmegaConf.from_dotlist(list(overrides)))
    return to_phase_config(merged)


KNOWN_TASKS: tuple[str, ...] = ()  # filled when task evaluation (lm-eval-harness) lands


def check_tasks(tasks: list[str]) -> None:
    """Fail before any work when a task is unknown (every task, in this build)."""
    unknown = [t for t in tasks if t not in KNOWN_TASKS]
    if unknown:
        raise ValueError(f"--tasks {','.join(unknown)}: task evaluation is not available in this version; run "
                         "without --tasks for the phase-end check")


def run_tasks(tasks: list[str], checkpoint: Path, cfg, out: Path) -> dict:
    """Task evaluation on the export: {task: metrics}. The lm-eval-harness model class plugs in here."""
    check_tasks(tasks)
    return {}


def evaluate(args) -> dict:
    """Run the phase-end check (and tasks, when asked) on the export; returns the result dict."""
    from ar2diff.checkpoint.export_layout import read_metadata
    from ar2diff.data.loader import load_packed
    from ar2diff.data.tokenizer import load_tokenizer
    from ar2diff.decode.evaluate import phase_end_eval
    from ar2diff.logging import RunLogger

    tasks = args.tasks.split(",") if args.tasks else []
    check_tasks(tasks)
    checkpoint = Path(args.checkpoint)
    meta = read_metadata(checkpoint)  # the completeness check names a missing or truncated file
    cfg = load_config(checkpoint, args.config, args.overrides)
    out = Path(args.out) if args.out else checkpoint
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(str(checkpoint))
    data = SimpleNamespace(heldout=load_packed(cfg.data, tokenizer, "heldout"))
    logger = RunLogger(out, 0, name=f"evaluate:{checkpoint.name}", group=None, config={}, wandb_cfg=None)
    result = phase_end_eval(cfg=cfg, export_dir=checkpoint, run_dir=out, logger=logger, step=meta.get("step") or 0,
                            data=data, tokenizer=tokenizer, rank=0)
    if tasks:
        result["tasks"] = run_tasks(tasks, checkpoint, cfg, out)
    return result


def main(argv: list[str] | None = None) -> int:
    from ar2diff.cli_errors import USER_ERRORS, report

    args = build_parser().parse_args(argv)
    try:
        evaluate(args)
    except USER_ERRORS as err:
        return report(PROG, err, rank=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
