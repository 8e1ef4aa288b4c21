"""Decoding benchmark: tokens per forward and wall-clock tokens/s per sampler, against AR, in one process.

Samplers: the AR baseline (`decode_ar`, the model's own KV cache), TiDAR lossless, TiDAR logit mixing at each
--mix-weights, and transformers' own `generate(do_sample=False)` on the same model (greedy, batch 1, EOS ignored
everywhere so every sampler produces exactly --max-new-tokens tokens per prompt). Each sampler is warmed up once,
then timed end to end over --repeats passes; ratios are against AR measured in the same run.

Prompts: the first --prompt-len tokens of the interpreter's standard-library files that fall in the default
corpus' held-out split (data.heldout_fraction 0.02), or --prompts-file (one JSON string per line); with --tiny,
a random model and random prompt ids (acceptance is then near zero: it measures overhead, not a trained drafter).

--cache-sweep 64,256,896 times instead the TiDAR step (lossless) with the cache and with the full-prefix recompute
(use_cache=False) at each prompt length: with the cache the step time stays flat in the prompt length.

    python scripts/bench_decode.py --tiny                       # a random tiny_qwen3_moe, CPU
    python scripts/bench_decode.py --tiny tiny_zaya --cache-sweep 64,256,896 --mix-weights ''
    python scripts/bench_decode.py outputs/quickstart/<ts>/export --out bench_decode.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import conf_model  # noqa: E402  (a sibling script, not a package)

DEFAULT_HELDOUT_FRACTION = 0.02


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="exported checkpoint folder (config.json, safetensors, tokenizer)")
    p.add_argument("--tiny", nargs="?", const="tiny_qwen3_moe", default=None, metavar="CONF_MODEL",
                   help="benchmark a random model from conf/model/<name>.yaml instead (default "
                        "tiny_qwen3_moe; tiny_zaya is the quickstart's ZAYA)")
    p.add_argument("--prompts", type=int, default=4, help="number of prompts")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    p.add_argument("--prompts-file", help="one JSON string per line instead of stdlib prompts")
    p.add_argument("--windows", choices=("heads", "middle"), default="heads",
                   help="stdlib prompts: the heads of held-out files, or windows past their heads (shuffled with "
                        "--seed; disjoint from the heads, which the phase-end check and earlier choices used)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; --windows middle: which windows")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--mix-weights", default="0.25,0.5", help="comma-separated mixing weights ('' for none)")
    p.add_argument("--block-size", type=int, default=None, help="default: the checkpoint's (--tiny: 16)")
    p.add_argument("--levels", default="all", help="'all' or acceptance levels to draft, e.g. 4,7,10")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (generate is always greedy)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes over the prompts per sampler")
    p.add_argument("--device", default="cpu", help="torch device (cuda also on ROCm builds)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--cache-sweep", default=None, metavar="LENS",
                   help="comma-separated prompt lengths: time the TiDAR step with and without the cache instead")
    p.add_argument("--out", default="bench_decode.json", help="JSON results file")
    return p


def stdlib_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """First `length` tokens of the first `n` held-out stdlib files (sorted paths) that are long enough."""
    from ar2diff.data.sources import in_heldout, read_stdlib_file, stdlib_files

    out = []
    for rel in stdlib_files():
        if in_heldout(rel, DEFAULT_HELDOUT_FRACTION):
            text, _ = read_stdlib_file(rel)
            ids = tokenizer.encode(text, add_special_tokens=False) if text else []
            if len(ids) >= length:
                out.append(ids[:length])
                if len(out) == n:
                    return out
    raise SystemExit(f"only {len(out)} held-out stdlib files have {length} tokens; lower --prompts/--prompt-len")


def file_prompts(path: str, tokenizer, n: int, length: int) -> list[list[int]]:
    texts = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    prompts = [tokenizer.encode(t, add_special_tokens=False)[:length] for t in texts[:n]]
    if len(prompts) < n or not all(prompts):
        raise SystemExit(f"--prompts-file {path}: need {n} non-empty prompts, got {len([p for p in prompts if p])}")
    return prompts


def load(args):
    """(TidarLM, prompts, description)."""
    from ar2diff.model import TidarLM

    dtype = getattr(torch, args.dtype)
    if args.tiny:
        lm, mask_id = conf_model(args.tiny)
        block = args.block_size or 16
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, mask_id, (args.prompts, args.prompt_len), generator=g).tolist()
        return TidarLM(lm.to(dtype).to(args.device), mask_id, block).eval(), prompts, f"random {args.tiny}"
    from ar2diff.checkpoint.reader import load_export

    try:
        export = load_export(args.checkpoint, dtype=dtype, device=args.device, block_size=args.block_size)
        model = export.tidar()
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--checkpoint: {err}") from None
    tokenizer = export.tokenizer
    if args.prompts_file:
        prompts = file_prompts(args.prompts_file, tokenizer, args.prompts, args.prompt_len)
    elif args.windows == "middle":
        from router_load import middle_windows  # a sibling script that imports this one

        prompts = middle_windows(tokenizer, args.prompts, args.prompt_len, DEFAULT_HELDOUT_FRACTION, args.seed)
    else:
        prompts = stdlib_prompts(tokenizer, args.prompts, args.prompt_len)
    return model, prompts, str(args.checkpoint)


def timed(fn, repeats: int, device) -> tuple[list, float]:
    """(last result, seconds per pass: the median over repeats)."""
    fn()  # warm-up
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return result, sorted(times)[len(times) // 2]


def generate_all(lm, prompts, n: int) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=lm.device)
            gen = lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                              eos_token_id=None, pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    return out


def cache_sweep(model, prompt_lens: list[int], args, device) -> dict:
    """Milliseconds per TiDAR forward (lossless) with the cache and with the full-prefix recompute, per prompt
    length; the prompts are the first `length` tokens of longer random (--tiny) or stdlib prompts."""
    from ar2diff.decode.tidar import TidarConfig, decode_tidar

    levels = "all" if args.levels == "all" else tuple(int(x) for x in args.levels.split(","))
    rows = {}
    for length in prompt_lens:
        if args.tiny:
            g = torch.Generator().manual_seed(length)
            prompts = torch.randint(3, model.mask_token_id, (args.prompts, length), generator=g).tolist()
        else:
            from transformers import AutoTokenizer

            prompts = stdlib_prompts(AutoTokenizer.from_pretrained(args.checkpoint), args.prompts, length)
        row = {}
        for name, use_cache in (("cache", True), ("recompute", False)):
            cfg = TidarConfig(max_new_tokens=args.max_new_tokens, levels=levels, temperature=args.temperature,
                              use_cache=use_cache)
            results, seconds = timed(lambda: decode_tidar(model, prompts, cfg), args.repeats, device)
            forwards = sum(r.forwards for r in results)
            row[name] = {"ms_per_forward": 1000 * seconds / forwards, "forwards": forwards,
                         "tokens_per_forward": sum(len(r.token_ids) for r in results) / forwards}
        row["recompute_over_cache"] = row["recompute"]["ms_per_forward"] / row["cache"]["ms_per_forward"]
        rows[length] = row
    head = f"{'prompt':>7} {'cache ms/fwd':>13} {'recompute ms/fwd':>17} {'ratio':>6} {'tokens/fwd':>10}"
    print(head + "\n" + "-" * len(head))
    for length, r in rows.items():
        print(f"{length:>7} {r['cache']['ms_per_forward']:>13.2f} {r['recompute']['ms_per_forward']:>17.2f} "
              f"{r['recompute_over_cache']:>6.2f} {r['cache']['tokens_per_forward']:>10.2f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    from ar2diff.config.schema import DecoderEvalConfig
    from ar2diff.decode.ar import summarize
    from ar2diff.decode.run import run_decoder
    from ar2diff.evaluation.decoder_check import agreement, sampler_configs

    args = build_parser().parse_args(argv)
    if (args.checkpoint is None) == (args.tiny is None):
        raise SystemExit("give an exported checkpoint folder or --tiny (not both)")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, prompts, what = load(args)
    device = torch.device(args.device)
    if args.cache_sweep:
        lens = [int(x) for x in args.cache_sweep.split(",")]
        print(f"{what}: TiDAR step time, {args.prompts} prompts, {args.max_new_tokens} new tokens, block "
              f"{model.block_size}, levels {args.levels}, {args.device}/{args.dtype}")
        rows = cache_sweep(model, lens, args, device)
        Path(args.out).write_text(json.dumps({"model": what, "settings": vars(args), "threads":
                                              torch.get_num_threads(), "cache_sweep": rows}, indent=2))
        print(f"wrote {args.out}")
        return 0
    weights = [float(w) for w in args.mix_weights.split(",") if w.strip()]
    levels = None if args.levels == "all" else [int(x) for x in args.levels.split(",")]
    dcfg = DecoderEvalConfig(num_prompts=args.prompts, prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens,
                             block_size=model.block_size, levels=levels, mix_weights=weights,
                             temperature=args.temperature, seed=args.seed)
    rows, outputs = {}, {}
    for name, cfg in sampler_configs(dcfg, None, model.block_size, args.temperature).items():
        results, seconds = timed(lambda: run_decoder(model, prompts, cfg), args.repeats, device)
        s = summarize(results)
        outputs[name] = results
        rows[name] = {"tokens_per_forward": s["tokens_per_forward"], "acceptance_histogram": s["acceptance_histogram"],
                      "tokens": s["tokens"], "seconds": seconds, "tokens_per_s": s["tokens"] / seconds,
                      "agreement_with_ar": agreement(outputs["ar"], results)[0]}
    gen_ids, seconds = timed(lambda: generate_all(model.lm, prompts, args.max_new_tokens), args.repeats, device)
    tokens = sum(map(len, gen_ids))
    rows["hf_generate"] = {"tokens_per_forward": 1.0, "acceptance_histogram": None, "tokens": tokens,
                           "seconds": seconds, "tokens_per_s": tokens / seconds,
                           "agreement_with_ar": sum(g == r.token_ids for g, r in zip(gen_ids, outputs["ar"]))
                           / len(prompts) if args.temperature == 0 else None}
    for r in rows.values():
        r["speedup_vs_ar"] = r["tokens_per_s"] / rows["ar"]["tokens_per_s"]

    print(f"{what}: {len(prompts)} prompts x {args.prompt_len} tokens, {args.max_new_tokens} new tokens, block "
          f"{model.block_size}, levels {args.levels}, temperature {args.temperature}, {args.device}/{args.dtype}")
    head = f"{'sampler':<14} {'tokens/fwd':>10} {'tokens/s':>10} {'vs AR':>7} {'agree AR':>9}"
    print(head + "\n" + "-" * len(head))
    for name, r in rows.items():
        agree = "-" if r["agreement_with_ar"] is None else f"{r['agreement_with_ar']:.3f}"
        print(f"{name:<14} {r['tokens_per_forward']:>10.3f} {r['tokens_per_s']:>10.1f} {r['speedup_vs_ar']:>7.2f} "
              f"{agree:>9}")
    print("agree AR: fraction of tokens equal to AR's (hf_generate: of prompts with identical output)")
    report = {"model": what, "settings": {**vars(args), "decoder": asdict(dcfg)}, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "results": rows}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
