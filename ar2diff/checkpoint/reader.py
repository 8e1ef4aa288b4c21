"""`load_export(dir)`: the one reader of an exported folder, used by the decoder CLI, the phase-end check and the
benchmarks. It loads the transformers model (and tokenizer) and reads the TiDAR settings, mask token id and block
size, from ``ar2diff.json`` when the folder has one, else from ``config.json`` (``mask_token_id``,
``tidar_block_size``), cross-checking the two and the tokenizer's mask token. The files of an export are checked
against the size and sha256 its marker records before the weights are read (``ar2diff.model.loading``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ar2diff.checkpoint.export_layout import BLOCK_SIZE_CONFIG_KEY, METADATA_NAME, read_metadata
from ar2diff.model.loading import load_model
from ar2diff.model.tidar import TidarLM


@dataclass
class LoadedExport:
    """A loaded export: the transformers model, its tokenizer (or None) and the TiDAR settings it was trained with."""

    path: Path
    lm: Any
    tokenizer: Any
    mask_token_id: int | None
    block_size: int | None
    metadata: dict = field(default_factory=dict)

    def tidar(self):
        """The `TidarLM` adapter around the model (eval mode); a one-line error when this is no TiDAR export."""
        if self.mask_token_id is None:
            raise ValueError(f"{self.path / 'config.json'} has no mask_token_id: this is not a TiDAR checkpoint "
                             "(export one with python -m ar2diff.export), or decode with the AR sampler (--sampler ar)")
        if self.block_size is None:
            raise ValueError(f"{self.path / 'config.json'} has no {BLOCK_SIZE_CONFIG_KEY}; pass --block-size")
        return TidarLM(self.lm, self.mask_token_id, self.block_size).eval()


def load_export(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device=None,
                block_size: int | None = None, with_tokenizer: bool = True, *, verify: bool | None = None,
                collective: bool = False) -> LoadedExport:
    """Load an export folder (or any transformers checkpoint folder: then only AR decoding is possible).
    `block_size` overrides the trained block size (decoding with a different one). `verify`: re-hash the export's
    files against their recorded sha256 (None: yes unless AR2DIFF_VERIFY_EXPORTS=0); `collective`: every rank loads
    this export now and hashes a share of it (``ar2diff.model.loading.verify_export_files``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model checkpoint folder {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a transformers checkpoint folder")
    meta = read_metadata(path) if (path / METADATA_NAME).is_file() else {}
    lm = load_model(path, dtype=dtype, verify=verify, collective=collective)
    if device is not None:
        lm = lm.to(device)
    mask_id, block = _setting(path, lm.config, meta, "mask_token_id", "mask_token_id"), \
        _setting(path, lm.config, meta, "block_size", BLOCK_SIZE_CONFIG_KEY)
    tokenizer = None
    if with_tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        tok_mask = getattr(tokenizer, "mask_token_id", None)
        if mask_id is not None and tok_mask is not None and tok_mask != mask_id:
            raise ValueError(f"{path / 'config.json'} says mask_token_id={mask_id} but the tokenizer's mask token "
                             f"has id {tok_mask}; the checkpoint's tokenizer and config disagree")
    block = block_size if block_size is not None else block
    return LoadedExport(path=path, lm=lm, tokenizer=tokenizer, mask_token_id=mask_id,
                        block_size=None if block is None else int(block), metadata=meta)


def _setting(path: Path, config, meta: dict, key: str, config_key: str) -> int | None:
    """A TiDAR setting from ar2diff.json and config.json, which must agree when both state it."""
    from_config, from_meta = getattr(config, config_key, None), meta.get(key)
    if from_config is not None and from_meta is not None and from_config != from_meta:
        raise ValueError(f"{path}: config.json {config_key}={from_config} disagrees with {METADATA_NAME} "
                         f"{key}={from_meta}; export the checkpoint again")
    value = from_meta if from_meta is not None else from_config
    return None if value is None else int(value)

