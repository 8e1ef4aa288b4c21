"""Typed data configuration: sources, packing length, held-out split, tokenizer, cache.

Plain dataclasses only (Hydra builds them as structured configs); `validate()` is called once at
start-up and raises ValueError naming the bad key and how to fix it.
"""
from dataclasses import dataclass, field

SOURCE_KINDS = ("stdlib", "stdlib_chat", "stdlib_docs", "files", "hub", "tokens", "megatron")
TOKEN_KINDS = ("tokens", "megatron")  # already tokenized: read memory-mapped, never re-tokenized
TOKEN_DTYPES = ("auto", "uint16", "uint32", "int32")
FORMATS = ("jsonl", "parquet", "text", "auto")
SAMPLE_BY = ("document", "paragraph", "line")


@dataclass
class SourceConfig:
    """One data source of a weighted mixture.

    kind="stdlib": the running interpreter's standard-library `.py` files; `path` is an optional
        fnmatch filter on their relative paths (e.g. "json/*"), "" means every file.
    kind="files": local files; `path` is a file, a directory (every file in it) or a glob.
    kind="stdlib_chat": chat records made from the stdlib's documented functions (data/stdlib_chat.py): the
        quickstart's SFT data; needs data.chat=true. `path` filters files as for stdlib.
    kind="stdlib_docs": the library reference's topics (`pydoc_data.topics`: English prose, one document per
        topic), which kind=stdlib leaves out: an out-of-domain held-out set for a code run. `path` filters topics.
    kind="hub": a Hugging Face hub dataset name loaded with `datasets.load_dataset(path, split=split)`.
    kind="tokens": flat token files (`.npy`, or raw `.bin` with `dtype`), a file or glob; documents end at
        each `eos_id` (the OLMo/nanoGPT convention), or are given by `offsets_path` (one file only: an int64
        `.npy` of document boundaries 0..len). Read memory-mapped (data/tokenfile.py).
    kind="megatron": a Megatron indexed dataset, `path` = the prefix of its `.bin`/`.idx` pair (or either file).
    `eos_id`: the id that ends documents in a token file (token files store no vocabulary); it must equal the
        tokenizer's EOS. `dtype`: the element type of a raw `.bin` token file (`.npy`/`.idx` carry their own).
    `weight` is this source's share of sampled training rows (tokens), relative to the other sources.
    `sample_by` (text files only): one document per file, per blank-line paragraph, or per line.
    `max_docs` keeps the first N records of the source (quick runs and debugging).
    """

    kind: str = "stdlib"
    path: str = ""
    format: str = "auto"
    text_field: str = "text"
    messages_field: str = "messages"
    weight: float = 1.0
    split: str = "train"
    name: str | None = None
    sample_by: str = "document"
    max_docs: int | None = None
    eos_id: int | None = None
    offsets_path: str = ""
    dtype: str = "auto"

    def display_name(self) -> str:
        """The name used in logs, stats and cache folders."""
        if self.name:
            return self.name
        if self.kind == "stdlib":
            return "stdlib"
        return self.path.rstrip("/").replace("\\", "/").split("/")[-1] or self.kind


@dataclass
class DataConfig:
    """Everything the data pipeline needs; every field can be overridden from the command line.

    heldout_fraction: share of documents (stdlib: of files) held out, chosen by a hash of the document
        (stdlib: of the file's relative path), so the split is the same on every run and machine.
    chat: format records as chat (SFT): loss only on assistant responses.
    max_doc_tokens: documents longer than this (counted with their EOS) are skipped and counted as
        "too_long"; skipping (not truncating) keeps SFT responses whole. None: no limit.
    tokenizer_path: a local Hugging Face tokenizer folder; None trains (and caches) a byte-level BPE
        of `bpe_vocab_size` ids on the train split of the stdlib corpus.
    bpe_max_bytes: train the BPE on at most this many bytes of that corpus (tests, quick runs).
    cache_dir: where the tokenizer, the prepared token files, token-file indexes and datasets files are kept.
    num_proc: processes that tokenize when the trainer prepares a text source itself (small data).
    max_inline_bytes: a text source larger than this on disk (about 4 min of one process tokenizing) is not
        tokenized by the trainer: prepare it first with `python -m ar2diff.data.prepare`, so ranks never wait on
        one rank tokenizing terabytes. Token files count 1/32 of their bytes (their index pass only reads).
    max_repeats: warn at start-up when the token budget repeats a source more than this many times.
    """

    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    seq_len: int = 2048
    heldout_fraction: float = 0.02
    seed: int = 0
    chat: bool = False
    max_doc_tokens: int | None = None
    tokenizer_path: str | None = None
    bpe_vocab_size: int = 8192
    bpe_max_bytes: int | None = None
    cache_dir: str = "~/.cache/ar2diff/data"
    num_proc: int = 1
    max_inline_bytes: int = 256 << 20
    max_repeats: float = 4.0

    def validate(self) -> "DataConfig":
        """Raise ValueError naming the first bad key; return self so calls can chain."""
        if not self.sources:
            raise ValueError("data.sources is empty: list at least one source (e.g. kind: stdlib)")
        names = []
        for i, src in enumerate(self.sources):
            validate_source(src, f"data.sources[{i}]", self.chat)
            names.append(src.display_name())
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"data.sources: names {dup} are used twice; give each source a distinct `name`")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len={self.seq_len} must be >= 2")
        if self.seed < 0:
            raise ValueError(f"data.seed={self.seed} must be >= 0")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"data.heldout_fraction={self.heldout_fraction} must be in [0, 1)")
        if self.max_doc_tokens is not None and self.max_doc_tokens < 1:
            raise ValueError(f"data.max_doc_tokens={self.max_doc_tokens} must be >= 1 or null (no limit)")
        if self.tokenizer_path is None and self.bpe_vocab_size < 300:
            raise ValueError(f"data.bpe_vocab_size={self.bpe_vocab_size} must be >= 300 (256 bytes + specials)")
        if self.bpe_max_bytes is not None and self.bpe_max_bytes < 1:
            raise ValueError(f"data.bpe_max_bytes={self.bpe_max_bytes} must be >= 1 or null (whole corpus)")
        if not self.cache_dir:
            raise ValueError("data.cache_dir is empty: give a writable folder")
        if self.num_proc < 1:
            raise ValueError(f"data.num_proc={self.num_proc} must be >= 1")
        if self.max_inline_bytes < 0:
            raise ValueError(f"data.max_inline_bytes={self.max_inline_bytes} must be >= 0")
        if not self.max_repeats > 0:
            raise ValueError(f"data.max_repeats={self.max_repeats} must be > 0")
        return self


def validate_source(src: SourceConfig, key: str, chat: bool) -> None:
    """Raise ValueError naming `key` (e.g. "data.sources[0]") and the first bad field of one source."""
    if src.kind not in SOURCE_KINDS:
        raise ValueError(f"{key}.kind={src.kind!r} must be one of {SOURCE_KINDS}")
    if src.format not in FORMATS:
        raise ValueError(f"{key}.format={src.format!r} must be one of {FORMATS}")
    if src.sample_by not in SAMPLE_BY:
        raise ValueError(f"{key}.sample_by={src.sample_by!r} must be one of {SAMPLE_BY}")
    if src.kind in ("files", "hub", "tokens", "megatron") and not src.path:
        raise ValueError(f"{key}.path is empty: give a file/glob (kind=files/tokens), a dataset name (kind=hub) "
                         "or a .bin/.idx prefix (kind=megatron)")
    if src.dtype not in TOKEN_DTYPES:
        raise ValueError(f"{key}.dtype={src.dtype!r} must be one of {TOKEN_DTYPES}")
    if src.kind in TOKEN_KINDS:
        if chat:
            raise ValueError(f"{key}.kind={src.kind} holds token ids without a loss mask; data.chat=true needs "
                             "text chat records (kind files/hub)")
        if src.eos_id is None and not (src.kind == "tokens" and src.offsets_path):
            raise ValueError(f"{key}.eos_id is not set: token files store no vocabulary, so declare the id that "
                             "ends each document (or give offsets_path for kind=tokens)")
        if src.eos_id is not None and src.eos_id < 0:
            raise ValueError(f"{key}.eos_id={src.eos_id} must be >= 0")
    elif src.offsets_path or src.eos_id is not None:
        raise ValueError(f"{key}: eos_id/offsets_path apply to kind=tokens/megatron only, not kind={src.kind}")
    if not src.weight > 0:
        raise ValueError(f"{key}.weight={src.weight} must be > 0")
    if src.max_docs is not None and src.max_docs < 1:
        raise ValueError(f"{key}.max_docs={src.max_docs} must be >= 1 or null")
    if src.kind == "stdlib_chat" and not chat:
        raise ValueError(f"{key}.kind=stdlib_chat yields chat records; set data.chat=true")
    if chat and src.kind in ("stdlib", "stdlib_docs"):
        raise ValueError(f"{key}.kind={src.kind} has no chat messages but data.chat=true; use kind files/hub")
    if chat and src.format == "text":
        raise ValueError(f"{key}.format=text has no chat messages but data.chat=true; use jsonl/parquet")
