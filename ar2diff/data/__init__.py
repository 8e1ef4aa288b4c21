"""Data: sources (files, hub, stdlib corpus), tokenizer, SFT formatting, packing, held-out split, loader.

    cfg = DataConfig(seq_len=1024).validate()
    tok = get_tokenizer(cfg)                      # trains + caches the stdlib BPE on first use
    loaders = build_dataloaders(cfg, tok, batch_size=8, rank=rank, world_size=world)
    batch = next(loaders.train)                   # dict of (B, S) tensors, see packing.py

The configs (`DataConfig`, `SourceConfig`) are plain dataclasses in `ar2diff.config.data`.
"""

import warnings

from ar2diff.config.data import DataConfig, SourceConfig
from ar2diff.data.compact import TokenRows
from ar2diff.data.loader import (
    DataLoaders,
    PackedDataset,
    TrainBatches,
    build_dataloaders,
    heldout_rows,
    load_packed,
    mixture_order,
    prepare_data,
)
from ar2diff.data.packing import pack_documents, rows_from_stream
from ar2diff.data.prepare import prepare_all
from ar2diff.data.sft import TemplateError, encode_chat
from ar2diff.data.sources import stdlib_corpus
from ar2diff.data.stats import DataStats
from ar2diff.data.tokenizer import DEFAULT_CHAT_TEMPLATE, get_tokenizer, load_tokenizer, train_bpe

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "DataConfig",
    "DataLoaders",
    "DataStats",
    "PackedDataset",
    "SourceConfig",
    "TemplateError",
    "TokenRows",
    "TrainBatches",
    "build_dataloaders",
    "encode_chat",
    "get_tokenizer",
    "heldout_rows",
    "load_packed",
    "load_tokenizer",
    "mixture_order",
    "pack_documents",
    "prepare_all",
    "prepare_data",
    "rows_from_stream",
    "stdlib_corpus",
    "train_bpe",
]

# `python -m ar2diff.data.prepare` runs a module this package has already imported (the loader uses it); runpy warns
# about that after importing the package, which would put a second line under every one-line error of that command.
# Harmless here: the module defines no class whose identity matters.
warnings.filterwarnings("ignore", message=r"'ar2diff\.data\.prepare' found in sys\.modules", category=RuntimeWarning)
