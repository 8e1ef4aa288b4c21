"""Time and peak memory of building the flex BlockMask of one TiDAR row: the run-structure builder vs torch's eager
`create_block_mask` (the old path, which evaluates the predicate on the dense (2S)x(2S) grid first).

Each measurement runs in a fresh process: peak RSS after the build minus RSS before it (the layout's records are
built first). The eager path is measured up to 2S = 16k and extrapolated quadratically beyond (it would not fit a
24 GB machine at 64k). The row packs three documents and ends in padding; TiDAR block size 16, flex tile 128.

    PYTHONPATH=$PWD python scripts/bench_mask.py [--out bench_mask.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

NEW_LENGTHS = (16_384, 65_536, 262_144)  # 2S
EAGER_LENGTHS = (8_192, 16_384)


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def measure(builder: str, layout_len: int, tile: int) -> dict:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    from ar2diff.model.attention import block_mask, mask_mod
    from ar2diff.model.layout import build_tidar_layout

    S = layout_len // 2
    docs = torch.zeros(1, S, dtype=torch.long)
    docs[0, S // 4:] = 1
    docs[0, S // 2:] = 2
    docs[0, S - S // 16:] = -1
    meta = build_tidar_layout(torch.zeros(1, S, dtype=torch.long), 1, 16, doc_ids_BS=docs).meta
    before = rss_bytes()
    start = time.perf_counter()
    if builder == "runs":
        bm = block_mask(meta, block_size=tile)
    else:
        bm = create_block_mask(mask_mod(meta, meta), 1, None, layout_len, layout_len, BLOCK_SIZE=tile)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    tiles = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum())
    return {"builder": builder, "layout_len": layout_len, "tile": tile, "seconds": seconds,
            "peak_extra_gb": peak / 1e9, "tiles_listed": tiles}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_mask.json")
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.tile)))
        return
    rows = []
    for builder, lengths in (("eager", EAGER_LENGTHS), ("runs", NEW_LENGTHS)):
        for length in lengths:
            proc = subprocess.run([sys.executable, __file__, "--tile", str(args.tile), "--one", builder, str(length)],
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    eager = [r for r in rows if r["builder"] == "eager"]
    per_pair = max(r["peak_extra_gb"] * 1e9 / r["layout_len"] ** 2 for r in eager)
    per_pair_s = max(r["seconds"] / r["layout_len"] ** 2 for r in eager)
    for length in NEW_LENGTHS:
        if length not in EAGER_LENGTHS:
            rows.append({"builder": "eager (extrapolated)", "layout_len": length, "tile": args.tile,
                         "seconds": per_pair_s * length ** 2, "peak_extra_gb": per_pair * length ** 2 / 1e9})
    print(f"{'builder':<22}{'2S':>9}{'seconds':>10}{'peak extra GB':>15}")
    for r in rows:
        print(f"{r['builder']:<22}{r['layout_len']:>9,}{r['seconds']:>10.2f}{r['peak_extra_gb']:>15.2f}")
    print(f"eager: {per_pair:.1f} bytes and {per_pair_s * 1e9:.2f} ns per (query, key) pair, extrapolated as such")
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
