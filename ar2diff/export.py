"""``python -m ar2diff.export``: a DeepSpeed checkpoint (any ZeRO stage, any world size) to the exported
transformers layout (the logic lives in ar2diff/checkpoint/export.py; this module is its command line).

    python -m ar2diff.export --checkpoint CKPT_ROOT_OR_TAG_DIR --out DEST [--tag step_...] [--base MODEL_DIR]

Works offline on one process. Expert-parallel (AutoEP) checkpoints are recognised from their completion marker.
The checkpoint's files are checked against the sha256 recorded at save first (``--no-verify`` skips that).
"""

from __future__ import annotations

import argparse
import sys

from ar2diff.dtypes import TORCH_DTYPES

__all__ = ["main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ar2diff.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint root (newest complete step) or a step_* folder")
    p.add_argument("--out", required=True, help="destination folder of the export")
    p.add_argument("--tag", default=None, help="step_XXXXXXXX under the checkpoint root (default: newest complete)")
    p.add_argument("--base", default=None, help="model folder to take config + tokenizer from if <root>/hf is missing")
    p.add_argument("--dtype", default="auto", choices=["auto", *TORCH_DTYPES], help="saved dtype (auto: the config's)")
    p.add_argument("--block-size", type=int, default=None, help="TiDAR block size if no run metadata records it")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip re-hashing the checkpoint's files against the sha256 recorded at save")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ar2diff.checkpoint.export import export_checkpoint  # deferred: DeepSpeed only when a checkpoint is read

    try:
        out = export_checkpoint(args.checkpoint, args.out, tag=args.tag, base=args.base, dtype=args.dtype,
                                block_size=args.block_size, max_shard_size=args.max_shard_size,
                                overwrite=args.overwrite, verify=args.verify)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"ar2diff.export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
