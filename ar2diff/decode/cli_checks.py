"""Argument checks of `python -m ar2diff.decode` that need no model: the device exists, and flags that would be
silently ignored or that leave the trained regime are pointed out (warnings on stderr, decoding goes on)."""

from __future__ import annotations

import sys

import torch

PROG = "python -m ar2diff.decode"


def warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def check_device(device: str) -> None:
    """Raise ValueError naming --device when torch cannot use it on this machine."""
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a torch device ({err}); use cpu or cuda") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: no CUDA/ROCm device is visible to torch on this machine; "
                             "use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {device}: only {count} device(s) visible (cuda:0..cuda:{count - 1})")


def ignored_flags(args) -> list[str]:
    """The flags given that the chosen sampler does not use."""
    if args.sampler != "ar":
        return []
    ignored = []
    if args.levels != "all":
        ignored.append("--levels")
    if args.block_size is not None:
        ignored.append("--block-size")
    if args.drafter_temperature is not None:
        ignored.append("--drafter-temperature")
    return ignored


def warn_ignored_flags(args) -> None:
    for flag in ignored_flags(args):
        warn(f"{flag} is ignored with --sampler ar (the AR baseline drafts nothing)")


def warn_block_size(block_size: int, trained: int | None) -> None:
    if trained is not None and block_size > trained:
        warn(f"--block-size {block_size} exceeds the block size the model was trained with ({trained}): drafts "
             "past that position were never trained, expect about one token per forward")
