"""Cost of one decoder forward against the number of tokens it feeds, per dtype: what a TiDAR step (drafts plus
one block of masks per drafted level) costs next to an AR step (one token), on this machine.

Each forward runs on a KV cache of --context tokens (cropped back after every forward); the best of --repeats
timed forwards is kept (after one untimed), and the ratio is to the one-token forward of the same dtype.

    python scripts/bench_forward.py /models/smollm2-135m --threads 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM

from ar2diff.dtypes import TORCH_DTYPES, cpu_bf16


def forward_ms(lm, context: int, tokens: int, repeats: int) -> float:
    vocab = lm.config.vocab_size
    with torch.no_grad():
        cache = lm(torch.randint(0, vocab, (1, context)), use_cache=True).past_key_values
        times = []
        for _ in range(repeats + 1):
            ids = torch.randint(0, vocab, (1, tokens))
            start = time.perf_counter()
            lm(ids, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - start)
            cache.crop(context)
    return 1000 * min(times[1:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a transformers model folder")
    p.add_argument("--tokens", default="1,8,16,24,40,72", help="tokens fed per forward")
    p.add_argument("--context", type=int, default=64, help="tokens already in the KV cache")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="bench_forward.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(cpu_bf16()[1])
    sizes = [int(t) for t in args.tokens.split(",")]
    rows = {}
    for name in args.dtypes.split(","):
        lm = AutoModelForCausalLM.from_pretrained(args.model, dtype=TORCH_DTYPES[name]).eval()
        ms = {t: forward_ms(lm, args.context, t, args.repeats) for t in sizes}
        rows[name] = {"ms": ms, "ratio_to_first": {t: v / ms[sizes[0]] for t, v in ms.items()}}
        print(f"{name:>9}  " + "  ".join(f"{t}: {v:.1f} ms ({v / ms[sizes[0]]:.2f}x)" for t, v in ms.items()))
    with open(args.out, "w") as fh:
        json.dump({"args": vars(args), "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
