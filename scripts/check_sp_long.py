"""Sequence parallelism with flex attention on one long row, on CPU: the sharded loss against one rank, and the
BlockMask each rank builds for a 128k row.

1. SP = 2 (two gloo ranks, launched by this script through torchrun), flex core, one row of S = 32768 whose three
   documents cross the shard edge and end in padding: the summed loss shares against the unsharded forward of the
   same model in one rank (forward only: torch 2.13 has no flex backward on CPU; the unsharded reference is flex
   too, since a dense SDPA mask of 2S = 64k does not fit here; flex against SDPA is checked at S = 8192 in
   tests/test_sequence_parallel.py).
2. The mask of a 2S = 256k row as the sharded forward builds it on every rank (`TidarLM.mask_argument` over the
   row's records, the same for any P since the core attention runs in layout order): seconds and peak extra RSS.

    PYTHONPATH=$PWD python scripts/check_sp_long.py [--seq-len 32768] [--mask-seq-len 131072] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_plan import high_water_bytes, reset_high_water, rss_bytes  # noqa: E402  (a sibling script)

MASK_ID = 255


def row(seq_len: int):
    """One row: documents of S/3 + 7, S/2 and the rest less 45 tokens, then 45 padding (doc -1)."""
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = seq_len // 3 + 7, seq_len // 2
    lengths = [a, b, seq_len - a - b - 45]
    docs = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)] + [torch.full((45,), -1)])[None]
    return {"input_ids": torch.randint(3, MASK_ID, (1, seq_len), generator=g), "doc_ids": docs}


def tiny_flex_model(seq_len: int):
    import torch

    from ar2diff.model import TidarLM, build_model
    from ar2diff.objective import TidarObjective

    config = dict(model_type="llama", vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=2 * seq_len)
    lm = build_model(config, attn_implementation="flex_attention", seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in lm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return TidarObjective(TidarLM(lm, MASK_ID, 16), mask_ratio=0.5).eval()


def worker(seq_len: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from ar2diff.trainer.distributed import init_distributed
    from ar2diff.trainer.sequence_parallel import install_sequence_parallel, sequence_parallel_mpu

    init_distributed()
    torch.set_num_threads(1)
    batch = row(seq_len)
    model = tiny_flex_model(seq_len)
    install_sequence_parallel(model, sequence_parallel_mpu(2).get_sequence_parallel_group(), micro_batch_size=1)
    start = time.perf_counter()
    with torch.no_grad():
        share = model(**batch, generator=torch.Generator().manual_seed(3)).loss
    sharded_s = time.perf_counter() - start
    dist.all_reduce(share)
    result = {"seq_len": seq_len, "sp": 2, "sharded_loss": float(share), "sharded_seconds": sharded_s}
    if dist.get_rank() == 0:
        torch.set_num_threads(2)  # the other rank is idle now
        start = time.perf_counter()
        with torch.no_grad():
            ref = tiny_flex_model(seq_len)(**batch, generator=torch.Generator().manual_seed(3)).loss
        result.update(one_rank_loss=float(ref), one_rank_seconds=time.perf_counter() - start,
                      abs_diff=abs(float(share) - float(ref)))
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def mask_build(seq_len: int) -> dict:
    """The flex BlockMask of one 2S row as `sharded_tidar_loss` builds it: seconds, peak RSS above the records."""
    import torch

    from ar2diff.model.layout import build_tidar_layout, sample_draft_mask

    model = tiny_flex_model(256)
    batch = row(seq_len)
    draft = sample_draft_mask((1, seq_len), 0.5, torch.Generator().manual_seed(3))
    layout = build_tidar_layout(batch["input_ids"], MASK_ID, 16, batch["doc_ids"], None, draft)
    before = rss_bytes()
    reset_high_water()
    start = time.perf_counter()
    mask = model.model.mask_argument(layout.meta, layout.meta, impl="flex_attention", split=seq_len)
    seconds = time.perf_counter() - start
    return {"layout_len": 2 * seq_len, "seconds": seconds, "peak_extra_mib": (high_water_bytes() - before) / 2**20,
            "kept_mib": (rss_bytes() - before) / 2**20, "tiles": list(mask.kv_num_blocks.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--mask-seq-len", type=int, default=131072)
    parser.add_argument("--out", default="check_sp_long.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--mask-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.seq_len, args.worker)
    if args.mask_only:
        return print(json.dumps(mask_build(args.mask_seq_len)))
    tmp = Path(args.out).with_suffix(".sp.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
                    "--seq-len", str(args.seq_len), "--worker", str(tmp)], check=True, env=env)
    sharded = json.loads(tmp.read_text())
    tmp.unlink()
    mask = json.loads(subprocess.run([sys.executable, __file__, "--mask-only", "--mask-seq-len",
                                      str(args.mask_seq_len)], check=True, capture_output=True, text=True,
                                     env=env).stdout.strip().splitlines()[-1])
    print(f"SP=2 flex, S={sharded['seq_len']}: sharded loss {sharded['sharded_loss']:.6f} "
          f"({sharded['sharded_seconds']:.1f} s), one rank {sharded['one_rank_loss']:.6f} "
          f"({sharded['one_rank_seconds']:.1f} s), |diff| {sharded['abs_diff']:.2e}")
    print(f"BlockMask of 2S={mask['layout_len']}: {mask['seconds']:.2f} s, peak {mask['peak_extra_mib']:.0f} MiB "
          f"above the records, {mask['kept_mib']:.0f} MiB kept")
    Path(args.out).write_text(json.dumps({"sharded": sharded, "mask": mask}, indent=1))


if __name__ == "__main__":
    main()
