"""The one table of dtype names a user may write (config `model.dtype`, `--dtype` options) and their torch dtypes."""

from __future__ import annotations

import torch

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str, key: str = "dtype") -> torch.dtype:
    """The torch dtype called `name`; a one-line error naming `key` and the choices otherwise."""
    if name not in TORCH_DTYPES:
        raise ValueError(f"{key}={name!r} is not one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


# CPU features that make bf16 matmuls fast (oneDNN uses them): AMX tiles, or AVX512 with bf16 dot products.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (or `cpuinfo`'s text); empty where there is no such file."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as fh:
                cpuinfo = fh.read()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_bf16(cpuinfo: str | None = None) -> tuple[bool, str]:
    """(whether bf16 runs fast on this CPU, a line saying why): AMX or AVX512-BF16 present."""
    found = [flag for flag in BF16_CPU_FLAGS if flag in cpu_flags(cpuinfo)]
    if found:
        return True, f"CPU bf16: fast ({', '.join(found)})"
    return False, "CPU bf16: slow (no amx_bf16 or avx512_bf16 flag): float32 is faster here"
