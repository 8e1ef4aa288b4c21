"""Data: sources (files, hub, stdlib corpus), tokenizer, SFT formatting, packing, held-out split, loader.

    cfg = DataConfig(seq_len=1024).validate()
    tok = get_tokenizer(cfg)                      # trains + caches the stdlib BPE on first use
    loaders = build_dataloaders(cfg, tok, batch_size=8, rank=rank, world_size=world)
    batch = next(loaders.train)                   # dict of (B, S) tensors, see packing.py

Names load on first use, so `ar2diff.data.config` (plain dataclasses) imports nothing that runs.
"""

_EXPORTS = {
    "DataConfig": "config", "SourceConfig": "config",
    "DataLoaders": "loader", "PackedDataset": "loader", "TrainBatches": "loader", "build_dataloaders": "loader",
    "heldout_rows": "loader", "load_packed": "loader", "mixture_order": "loader",
    "prepare_data": "loader", "TokenRows": "compact", "prepare_all": "prepare",
    "pack_documents": "packing", "rows_from_stream": "packing",
    "TemplateError": "sft", "encode_chat": "sft",
    "stdlib_corpus": "sources",
    "DataStats": "stats",
    "DEFAULT_CHAT_TEMPLATE": "tokenizer", "get_tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
    "train_bpe": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
