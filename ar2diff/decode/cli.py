"""`python -m ar2diff.decode`: the reference decoder on an exported checkpoint folder.

The folder is what `ar2diff.export` writes (config.json with `mask_token_id` and `tidar_block_size`, safetensors,
tokenizer files). Prompts come from `--prompt` (repeatable) and/or `--prompts-file` (one JSON string per line).
`--sampler ar` is the AR baseline, `lossless` / `mixing` the TiDAR decoder. Every bad input stops with a message
naming the argument; nothing falls back silently.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from ar2diff.checkpoint.reader import load_export
from ar2diff.decode.ar import decode_ar
from ar2diff.decode.cli_checks import check_device, warn_block_size, warn_ignored_flags
from ar2diff.decode.common import DecodeConfig, eos_of, summarize
from ar2diff.decode.levels import HARDWARE, resolve_auto_levels
from ar2diff.decode.tidar import TidarConfig, decode_tidar
from ar2diff.dtypes import TORCH_DTYPES, cpu_bf16
from ar2diff.export_format import check_tokenizer_files


class CliError(Exception):
    """A bad argument or checkpoint, reported as one line and exit status 2."""


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1] (0 = lossless, 1 = drafter logits), got {value}")
    return value


def _levels(text: str) -> str | tuple[int, ...]:
    if text in ("all", "auto"):
        return text
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"use 'all', 'auto' or comma-separated acceptance levels like 4,7,10; got "
                                         f"{text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ar2diff.decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="exported checkpoint folder (config.json, safetensors, tokenizer)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt text (repeatable)")
    p.add_argument("--prompts-file", help="file with one JSON string (a prompt) per line")
    p.add_argument("--sampler", choices=("ar", "lossless", "mixing"), default="lossless",
                   help="ar: AR baseline; lossless: TiDAR, exactly the AR distribution; mixing: TiDAR logit mixing")
    p.add_argument("--mix-weight", type=_unit_interval, default=None,
                   help="mixing weight w in [0, 1] of the diffusion logits (required with --sampler mixing)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--drafter-temperature", type=float, default=None, help="default: --temperature")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")
    p.add_argument("--block-size", type=int, default=None, help="default: tidar_block_size of config.json")
    p.add_argument("--levels", type=_levels, default="all",
                   help="'all', acceptance levels to draft (e.g. 4,7,10), or 'auto': the set maximizing projected "
                        "throughput on --hardware (ar2diff.decode.levels)")
    p.add_argument("--hardware", choices=sorted(HARDWARE), default=None,
                   help="with --levels auto: the cost model (accelerator roofline, or cpu: timed forwards here)")
    p.add_argument("--histogram", default=None,
                   help="with --levels auto: eval.json to read the acceptance histogram from (default: the "
                        "checkpoint's eval.json when present, else a calibration decode of the prompts)")
    p.add_argument("--projection-batch", type=int, default=1, help="with --levels auto: batch of the cost model")
    p.add_argument("--projection-context", type=int, default=4096,
                   help="with --levels auto on an accelerator: KV-cache tokens of the cost model")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (ROCm builds use cuda too)")
    p.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="float32")
    p.add_argument("--json", action="store_true", help="print the results as one JSON document")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap each prompt as a user turn in the tokenizer's chat template (for SFT exports)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="load without re-hashing the export's files against the sha256 recorded at export")
    return p


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise CliError(f"--prompts-file {str(path)!r} does not exist")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)
            except json.JSONDecodeError as e:
                raise CliError(f"--prompts-file {path}:{n} is not JSON ({e.msg}); write one JSON string per line") \
                    from None
            if not isinstance(text, str):
                raise CliError(f"--prompts-file {path}:{n} holds a {type(text).__name__}, not a JSON string")
            prompts.append(text)
    if not prompts:
        raise CliError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    for i, text in enumerate(prompts):
        if not text.strip():
            raise CliError(f"prompt {i} is empty: every prompt needs some text")
    return prompts


def encode_prompt(tokenizer, text: str, chat_template: bool) -> list[int]:
    """The prompt's token ids; with --chat-template, the text as one user turn in the tokenizer's chat template,
    ending in the assistant's generation prompt (how an SFT export was trained to see a request)."""
    if not chat_template:
        return tokenizer.encode(text)
    if not getattr(tokenizer, "chat_template", None):
        raise CliError("--chat-template: this checkpoint's tokenizer has no chat template")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer.encode(rendered, add_special_tokens=False)


def run(args) -> dict:
    """Load, decode, return the JSON-ready report (also what `--json` prints)."""
    texts = read_prompts(args)
    if args.sampler == "mixing" and args.mix_weight is None:
        raise CliError("--sampler mixing needs --mix-weight W (W in [0, 1])")
    if args.sampler != "mixing" and args.mix_weight is not None:
        raise CliError(f"--mix-weight applies only to --sampler mixing, not --sampler {args.sampler}")
    if (args.levels == "auto") != (args.hardware is not None):
        raise CliError("--levels auto needs --hardware (mi300x, mi355x, h100 or cpu), and --hardware applies only "
                       "to --levels auto")

    check_device(args.device)
    if str(args.device).startswith("cpu"):  # which --dtype pays on this CPU
        print(f"{cpu_bf16()[1]}; --dtype {args.dtype}", file=sys.stderr)
    warn_ignored_flags(args)
    check_tokenizer_files(args.checkpoint)
    export = load_export(args.checkpoint, dtype=TORCH_DTYPES[args.dtype], device=args.device,
                         block_size=args.block_size, verify=None if args.verify else False)
    lm, tokenizer = export.lm, export.tokenizer
    prompts = [encode_prompt(tokenizer, text, args.chat_template) for text in texts]
    for i, ids in enumerate(prompts):
        if not ids:
            raise CliError(f"prompt {i} ({texts[i]!r}) encodes to no tokens")
    shared = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  eos_token_id=None if args.ignore_eos else eos_of(lm, tokenizer), seed=args.seed)
    if args.sampler == "ar":
        cfg = DecodeConfig(**shared)
        results = decode_ar(lm, prompts, cfg, tokenizer=tokenizer)
    else:
        model = export.tidar()
        warn_block_size(model.block_size, getattr(lm.config, "tidar_block_size", None))
        cfg = TidarConfig(**shared, block_size=model.block_size,
                          levels="all" if args.levels == "auto" else args.levels, sampler=args.sampler,
                          mix_weight=args.mix_weight or 0.0, drafter_temperature=args.drafter_temperature)
        if args.levels == "auto":
            eval_json = args.histogram or (Path(args.checkpoint) / "eval.json")
            if args.histogram and not Path(args.histogram).is_file():
                raise CliError(f"--histogram {args.histogram!r} does not exist")
            auto = resolve_auto_levels(model, prompts, cfg, args.hardware,
                                       eval_json if Path(eval_json).is_file() else None,
                                       args.projection_batch, args.projection_context)
            cfg = replace(cfg, levels=tuple(auto["chosen"]["levels"]))
        results = decode_tidar(model, prompts, cfg, tokenizer=tokenizer)
    report = {"checkpoint": str(args.checkpoint), "sampler": args.sampler, "settings": asdict(cfg),
              "results": [dict(prompt=text, **r.to_json()) for text, r in zip(texts, results)],
              "summary": summarize(results)}
    if args.sampler != "ar" and args.levels == "auto":
        report["levels_auto"] = auto
    return report


def print_report(report: dict) -> None:
    for i, r in enumerate(report["results"]):
        print(f"=== prompt {i}: {r['prompt']!r}")
        print(r["text"])
        print(f"--- {len(r['token_ids'])} tokens, {r['forwards']} forwards, "
              f"{r['tokens_per_forward']:.2f} tokens/forward, stop: {r['stop']}, {r['wall_time_s']:.2f} s")
    if "levels_auto" in report:
        a = report["levels_auto"]
        print(f"=== --levels auto on {a['hardware']} (histogram from {a['source']}): levels {a['chosen']['levels']} "
              f"projected speedup {a['chosen']['speedup']:.2f} (all: {a['all']['speedup']:.2f}"
              + (f", Zyphra {a['zyphra']['levels']}: {a['zyphra']['speedup']:.2f})" if "zyphra" in a else ")"))
    s = report["summary"]
    print(f"=== {report['sampler']}: {s['tokens']} tokens in {s['forwards']} forwards = {s['tokens_per_forward']:.3f} "
          f"tokens/forward; acceptance histogram {s['acceptance_histogram']}; {s['tokens_per_s']:.1f} tokens/s")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except (CliError, ValueError, FileNotFoundError) as e:
        print(f"python -m ar2diff.decode: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0
