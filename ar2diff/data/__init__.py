"""Data: sources (files, hub, stdlib corpus), tokenizer, SFT formatting, packing, held-out split, loader.

    cfg = DataConfig(seq_len=1024).validate()
    tok = get_tokenizer(cfg)                      # trains + caches the stdlib BPE on first use
    loaders = build_dataloaders(cfg, tok, batch_size=8, rank=rank, world_size=world)
    batch = next(loaders.train)                   # dict of (B, S) tensors, see packing.py
"""
from .config import DataConfig, SourceConfig
from .loader import (DataLoaders, PackedDataset, TrainBatches, build_dataloaders, heldout_rows, load_packed,
                     mixture_order, prepare_data)
from .packing import pack_documents, rows_from_stream
from .sft import TemplateError, encode_chat
from .sources import stdlib_corpus
from .stats import DataStats
from .tokenizer import DEFAULT_CHAT_TEMPLATE, get_tokenizer, load_tokenizer, train_bpe

__all__ = [
    "DataConfig", "SourceConfig", "DataLoaders", "PackedDataset", "TrainBatches", "build_dataloaders",
    "heldout_rows", "load_packed", "mixture_order", "prepare_data", "pack_documents", "rows_from_stream",
    "TemplateError", "encode_chat", "stdlib_corpus", "DataStats", "DEFAULT_CHAT_TEMPLATE", "get_tokenizer",
    "load_tokenizer", "train_bpe",
]
