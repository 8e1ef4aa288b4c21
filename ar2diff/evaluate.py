"""`python -m ar2diff.evaluate --checkpoint EXPORT`: the phase-end check on any export, without retraining; with
`--tasks`, lm-eval-harness tasks instead.

    python -m ar2diff.evaluate --checkpoint RUN/export                       # the run's own held-out data
    python -m ar2diff.evaluate --checkpoint DIR data.sources.0.path=x.jsonl  # any export, any data (overrides)
    python -m ar2diff.evaluate --checkpoint RUN/export --light               # the light check only (a minute)
    python -m ar2diff.evaluate --checkpoint DIR --tasks hellaswag,gsm8k --sampler lossless   # lm-eval-harness

The configuration is the run's `resolved_config.json` next to the export (`RUN/export` -> `RUN/`) when there is
one, else the defaults; `KEY=VALUE` overrides (Hydra syntax) go on top, so the held-out split is the one the run
trained beside. The result is the phase-end check's `eval.json` (decode/evaluate.py `phase_end_eval`), written
into `--out` (default: the export folder). `--light` runs the light check of intermediate exports instead
(`ar2diff.evaluation.light_check`: held-out losses, teacher-forced agreement by draft offset, greedy lossless
against AR on `decoder.light_prompts` prompts) into `light_eval.json`: what an ablation sweep compares its runs by.

`--tasks` runs lm-eval-harness (`pip install 'ar2diff[lm_eval]'`; `ar2diff.evaluation.lm_eval_model`): loglikelihood
from the AR stream, generation through an ar2diff sampler (`--sampler ar|lossless|mixing --mix-weight W`), tokens
per forward beside each task's metrics; the report goes to `--output` (default: <checkpoint>/lm_eval.json).

The export's files are checked against the sha256 recorded at export before its weights are read; `--no-verify`
skips that (it sets AR2DIFF_VERIFY_EXPORTS=0 for this process, which every loader it reaches reads).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

from ar2diff.checkpoint.export_layout import read_metadata
from ar2diff.cli_errors import USER_ERRORS, report
from ar2diff.config.compose import compose, to_phase_config
from ar2diff.data.loader import load_packed
from ar2diff.data.tokenizer import load_tokenizer
from ar2diff.evaluation.light_check import light_check
from ar2diff.evaluation.phase_end import default_device, phase_end_eval
from ar2diff.export_format import VERIFY_ENV, check_weights
from ar2diff.fs import write_json_atomic
from ar2diff.logging import RunLogger
from ar2diff.trainer.resume_config import CONFIG_NAME

PROG = "python -m ar2diff.evaluate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="an exported checkpoint folder (python -m ar2diff.export)")
    p.add_argument("--config", default=None, help="a resolved_config.json (default: the one beside the export)")
    p.add_argument("--out", default=None, help="folder for eval.json and plots (default: the export folder)")
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval-harness task (or group) names")
    p.add_argument("--light", action="store_true",
                   help="the light check (losses, agreement by offset, greedy TPF) instead of the phase-end check")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="load the export without re-hashing its files against the sha256 recorded at export")
    tasks = p.add_argument_group("lm-eval-harness (with --tasks)")
    tasks.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAMLs (local tasks)")
    tasks.add_argument("--only-include-path", action="store_true",
                       help="index only --include-path's tasks, not lm-eval's built-in ones (faster start)")
    tasks.add_argument("--sampler", default="lossless", choices=("ar", "lossless", "mixing"))
    tasks.add_argument("--mix-weight", type=float, default=0.0, help="the mixing sampler's weight in (0, 1]")
    tasks.add_argument("--max-gen-toks", type=int, default=256)
    tasks.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    tasks.add_argument("--num-fewshot", type=int, default=None)
    tasks.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    tasks.add_argument("--device", default=None, help="torch device (default: the accelerator if any, else cpu)")
    tasks.add_argument("--seed", type=int, default=0)
    tasks.add_argument("--output", default=None, help="report JSON (default: <checkpoint>/lm_eval.json)")
    p.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE, e.g. data.heldout_fraction=0.1")
    return p


def load_config(checkpoint: Path, config: str | None, overrides: list[str]):
    """The PhaseConfig to evaluate with: the run's saved config (or the defaults), then `overrides`."""
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


def format_table(report: dict) -> str:
    lines = [f"sampler {report['sampler']}" + (f" (mix weight {report['mix_weight']:g})" if report["mix_weight"]
                                               else "")]
    for task, r in report["tasks"].items():
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items() if isinstance(v, (int, float)))
        tpf = r["tokens_per_forward"]
        lines.append(f"{task}: {metrics}" + (f" | tokens/forward {tpf:.2f}" if tpf is not None else ""))
    return "\n".join(lines)


def format_light(result: dict) -> str:
    g, agree = result["greedy"], result["agreement_by_offset"]
    tpf = g["tokens_per_forward"]
    return "\n".join([
        f"held-out loss: AR {result['heldout']['loss_ar']:.4f}, diffusion {result['heldout']['loss_diff']:.4f}",
        "teacher-forced argmax agreement by draft offset: " + " ".join(f"{a:.3f}" for a in agree["argmax_agree"])
        + f" (mean over drafts {agree['mean_over_drafts']['argmax_agree']:.3f})",
        f"greedy lossless on {g['prompts']} prompts: {tpf['tokens_per_forward']:.3f} tokens/forward "
        f"[{tpf['low']:.3f}, {tpf['high']:.3f}], {g['speedup_wall']:.2f}x AR in wall-clock, "
        f"agrees with AR on {g['agreement_tokens']:.3f} of tokens"])


def run_lm_eval(args) -> dict:
    """lm-eval-harness tasks on the export; writes and returns the report."""
    try:
        from ar2diff.evaluation.lm_eval_model import Ar2diffLM, run_tasks  # deferred: lm-eval is optional
    except ImportError as err:
        raise ValueError(f"--tasks needs lm-eval-harness: pip install 'ar2diff[lm_eval]' ({err})") from None

    if not Path(args.checkpoint).is_dir():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint!r} is not a folder")
    device = torch.device(args.device) if args.device else default_device()
    lm = Ar2diffLM.from_export(args.checkpoint, dtype=getattr(torch, args.dtype), device=device,
                               sampler=args.sampler, mix_weight=args.mix_weight, max_gen_toks=args.max_gen_toks,
                               seed=args.seed)
    report = run_tasks(lm, [t for t in args.tasks.split(",") if t], include_path=args.include_path,
                       limit=args.limit, num_fewshot=args.num_fewshot, include_defaults=not args.only_include_path)
    report["checkpoint"] = str(args.checkpoint)
    output = Path(args.output) if args.output else Path(args.checkpoint) / "lm_eval.json"
    write_json_atomic(output, json.loads(json.dumps(report, default=str)))
    print(format_table(report))
    print(f"report: {output}")
    return report


def evaluate(args) -> dict:
    """Run the phase-end check (and tasks, when asked) on the export; returns the result dict."""
    checkpoint = Path(args.checkpoint)
    meta = read_metadata(checkpoint)  # the completeness check names a missing or truncated file
    check_weights(checkpoint)  # and a corrupt safetensors header, before the data is prepared
    cfg = load_config(checkpoint, args.config, args.overrides)
    out = Path(args.out) if args.out else checkpoint
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(str(checkpoint))
    data = SimpleNamespace(heldout=load_packed(cfg.data, tokenizer, "heldout"))
    if args.light:
        result = light_check(cfg=cfg, export_dir=checkpoint, heldout=data.heldout, tokenizer=tokenizer,
                             device=default_device(), out_dir=out)
        print(format_light(result))
        return result
    logger = RunLogger(out, 0, name=f"evaluate:{checkpoint.name}", group=None, config={}, wandb_cfg=None)
    result = phase_end_eval(cfg=cfg, export_dir=checkpoint, run_dir=out, logger=logger, step=meta.get("step") or 0,
                            data=data, tokenizer=tokenizer, rank=0)
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    before = os.environ.get(VERIFY_ENV)
    if not args.verify:  # the phase-end check and the lm-eval model load the export themselves
        os.environ[VERIFY_ENV] = "0"
    try:
        run_lm_eval(args) if args.tasks else evaluate(args)
    except USER_ERRORS as err:
        return report(PROG, err, rank=0)
    finally:
        if before is None:
            os.environ.pop(VERIFY_ENV, None)
        else:
            os.environ[VERIFY_ENV] = before
    return 0


if __name__ == "__main__":
    sys.exit(main())
