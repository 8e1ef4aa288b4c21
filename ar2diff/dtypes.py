"""The one table of dtype names a user may write (config `model.dtype`, `--dtype` options) and their torch dtypes."""

from __future__ import annotations

import torch

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str, key: str = "dtype") -> torch.dtype:
    """The torch dtype called `name`; a one-line error naming `key` and the choices otherwise."""
    if name not in TORCH_DTYPES:
        raise ValueError(f"{key}={name!r} is not one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]
