"""Time per training step of the TiDAR objective against plain AR training: same model, batch and machine.

One step = forward (TidarObjective.forward, the [clean | masked] layout of 2S positions, or .forward_ar, the plain
causal forward of S positions) + backward + AdamW step. The two are interleaved over the repeats (after warm-up)
so drift in the machine's speed hits both alike; the table shows median seconds per step and the ratio
TiDAR / AR. The TiDAR forward runs twice the sequence, so ~2x is the floor for the matmuls; attention over 2S would
cost up to 4x the AR's in one dense call, and the split SDPA (`ar2diff.model.split_attention`) brings it to
1.7-1.9x with its runs of draft queries; `--compare-groups 0 4` times other run counts in the same loop (0 = one
dense call over (2S)^2, the code before the split).

    python scripts/bench_train.py                                  # tiny_zaya and tiny_qwen3_moe on CPU
    python scripts/bench_train.py --seq-len 4096 --batch 1 --compare-groups 0 4
    python scripts/bench_train.py --model path/to/export --seq-len 4096 --batch 1 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

CONF_MODELS = Path(__file__).resolve().parents[1] / "conf" / "model"
TINY_VOCAB = 512  # conf models take vocab_size from the tokenizer; a fixed one here (the last id is [MASK])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["tiny_zaya", "tiny_qwen3_moe"],
                   help="conf/model names (random init, vocab 512) or exported checkpoint folders")
    p.add_argument("--batch", type=int, default=4, help="rows per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row (S; the TiDAR layout has 2S)")
    p.add_argument("--block-size", type=int, default=16, help="TiDAR block size (exports: their own by default)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per objective first")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per objective")
    p.add_argument("--device", default="cpu", help="torch device (cuda also on ROCm builds)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--compare-groups", type=int, nargs="*", default=[],
                   help="also time TiDAR steps with these runs of draft queries in the split SDPA, interleaved in "
                        "the same loop (0: the whole (2S)^2 mask in one dense SDPA call, the code before the split)")
    p.add_argument("--out", default="bench_train.json", help="JSON results file")
    return p


def conf_model(name: str, vocab: int = TINY_VOCAB, min_positions: int = 0):
    """A random-init causal LM from conf/model/<name>.yaml, with `vocab` ids and a context of at least
    `min_positions` tokens; returns (lm, mask id)."""
    from omegaconf import OmegaConf

    from ar2diff.model import build_model

    path = CONF_MODELS / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONF_MODELS.glob("*.yaml"))
        raise SystemExit(f"--model {name}: not a folder and not a conf model (known: {known})")
    conf = OmegaConf.to_container(OmegaConf.load(path))
    if conf.get("config") is None:
        raise SystemExit(f"--model {name}: {path} builds from model.path, not a config; pass the folder instead")
    config = {**conf["config"], "vocab_size": vocab}
    config["max_position_embeddings"] = max(config.get("max_position_embeddings") or 0, min_positions)
    return build_model(config, seed=0), vocab - 1


def load_tidar(spec: str, block_size: int, device: str, dtype: torch.dtype, seq_len: int = 0):
    """(TidarLM, description) for a conf model name or an exported folder (its mask id and block size)."""
    from ar2diff.checkpoint.reader import load_export
    from ar2diff.model import TidarLM

    if Path(spec).is_dir():
        export = load_export(spec, dtype=dtype, with_tokenizer=False)
        lm, mask_id = export.lm, export.mask_token_id
        if mask_id is None:
            raise SystemExit(f"--model {spec}: config.json has no mask_token_id (not a TiDAR export)")
        block_size = export.block_size or block_size
    else:
        lm, mask_id = conf_model(spec, min_positions=seq_len)
        lm = lm.to(dtype)
    return TidarLM(lm.to(device), mask_id, block_size).train(), lm.config.model_type


def time_step(forward, batch, opt, device) -> float:
    start = time.perf_counter()
    out = forward(**batch)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_model(spec: str, args) -> dict:
    device = torch.device(args.device)
    from ar2diff.objective import TidarObjective

    model, model_type = load_tidar(spec, args.block_size, args.device, getattr(torch, args.dtype), args.seq_len)
    vocab = model.lm.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.mask_token_id, (args.batch, args.seq_len), generator=g).to(device)
    batch = {"input_ids": ids}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    objective = TidarObjective(model)
    forwards = {"ar": objective.forward_ar, "tidar": objective.forward}
    for groups in args.compare_groups:
        forwards[f"tidar_groups{groups}"] = with_draft_groups(objective.forward, groups)
    for _ in range(args.warmup):
        for fwd in forwards.values():
            time_step(fwd, batch, opt, device)
    times = {k: [] for k in forwards}
    for _ in range(args.repeats):
        for name, fwd in forwards.items():
            times[name].append(time_step(fwd, batch, opt, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * args.seq_len
    return {"model": spec, "model_type": model_type, "params": sum(p.numel() for p in model.parameters()),
            "vocab": vocab, "batch": args.batch, "seq_len": args.seq_len, "block_size": model.block_size,
            "seconds": times, "median_s": med, "tokens_per_s": {k: tokens / v for k, v in med.items()},
            "ratio_tidar_over_ar": med["tidar"] / med["ar"],
            "ratios_over_ar": {k: v / med["ar"] for k, v in med.items() if k != "ar"}}


def with_draft_groups(forward, groups: int):
    """`forward` with the split SDPA's runs of draft queries set to `groups` for its call (0: one dense call)."""
    import ar2diff.model.split_attention as split_attention
    import ar2diff.model.tidar as tidar
    from ar2diff.model.attention import attention_mask_for

    def dense(meta, S, dtype):
        return attention_mask_for("sdpa", meta, dtype=dtype)

    def split(meta, S, dtype):
        return split_attention.split_mask(meta, S, dtype, groups)

    def run(**batch):
        tidar.split_mask = dense if groups == 0 else split
        try:
            return forward(**batch)
        finally:
            tidar.split_mask = split_attention.split_mask

    return run


def print_table(rows: list[dict]) -> None:
    head = f"{'model':<18} {'type':<10} {'B x S':<10} {'AR s/step':>10} {'TiDAR s/step':>13} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        shape = f"{r['batch']}x{r['seq_len']}"
        print(f"{r['model']:<18} {r['model_type']:<10} {shape:<10} "
              f"{r['median_s']['ar']:>10.4f} {r['median_s']['tidar']:>13.4f} {r['ratio_tidar_over_ar']:>6.2f}")
        for name, ratio in r["ratios_over_ar"].items():
            if name != "tidar":
                print(f"{'':<18} {name:<21} {r['median_s'][name]:>24.4f} {ratio:>6.2f}")
    print("ratio = TiDAR / AR seconds per step (median); the TiDAR layout is 2S long, so ~2x is the floor.")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.batch, args.seq_len, args.repeats) < 1 or args.warmup < 0:
        raise SystemExit("--batch, --seq-len and --repeats must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(g < 0 for g in args.compare_groups):
        raise SystemExit("--compare-groups takes counts >= 0")
    rows = [bench_model(spec, args) for spec in args.model]
    print_table(rows)
    from ar2diff.model import split_attention

    report = {"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
              "draft_groups": split_attention.draft_groups(args.seq_len),
              "torch": torch.__version__, "warmup": args.warmup, "repeats": args.repeats, "results": rows}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
