"""Already-tokenized sources, read memory-mapped: flat token files and Megatron indexed datasets.

Flat token files (kind=tokens): `.npy` arrays, or raw `.bin` arrays of `dtype` (uint16/uint32/int32), one
token stream per file. Documents end at each `eos_id` (the OLMo/nanoGPT convention; tokens after a file's last
EOS form its last document), or are given by `offsets_path`: an int64 `.npy` of boundaries 0 = b_0 <= ... <= b_n
= len(tokens) (one token file).

Megatron indexed datasets (kind=megatron): `<prefix>.bin` holds the tokens; `<prefix>.idx` is
  b"MMIDIDX\\x00\\x00", version <Q> = 1, dtype code <B> (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16),
  sequence count <Q> = s, document count <Q> = d, int32 sequence lengths [s], int64 byte pointers [s],
  int64 document indices [d] (sequence index where each document starts; d = documents + 1, last = s).
A document is its sequences, which must lie back to back in the `.bin` (as Megatron's builder writes them).

The one-time index pass reads every token once: it finds the document boundaries, checks every id against the
tokenizer's vocabulary (a mismatch is refused, naming the file), picks the held-out documents (a hash of the
document's index, so it needs no text) and skips documents over data.max_doc_tokens. Its result is cached under
`<cache_dir>/index/`; after it, opening a source maps the token files and the index and reads nothing else.
"""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np

from ar2diff.config.data import DataConfig, SourceConfig

from . import stats as S
from .cache import build_once, cache_root, digest, tokenizer_fingerprint
from .compact import DamagedFile, Segment, open_npy, open_raw, read_json, reason_of, rebuild_hint
from .sources import files_fingerprint, resolve_files

INDEX_VERSION = 1
MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
CHUNK = 1 << 26  # tokens per step of the index pass


# ---------------------------------------------------------------- readers
def read_megatron_index(idx_path: Path) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """(dtype, sequence lengths int32, sequence byte pointers int64, document indices int64) of a `.idx` file."""
    with open(idx_path, "rb") as f:
        head = f.read(len(MEGATRON_MAGIC) + 8 + 1 + 8 + 8)
    if len(head) < 34 or head[:9] != MEGATRON_MAGIC:
        raise ValueError(f"{idx_path} is not a Megatron indexed-dataset index (no MMIDIDX header)")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
    if version != 1:
        raise ValueError(f"{idx_path}: index version {version} is not supported (expected 1)")
    if code not in MEGATRON_DTYPES:
        raise ValueError(f"{idx_path}: dtype code {code} is not an integer token type {sorted(MEGATRON_DTYPES)}")
    off = 34
    lengths = np.memmap(idx_path, np.int32, "r", offset=off, shape=(n_seq,)) if n_seq else np.zeros(0, np.int32)
    off += 4 * n_seq
    pointers = np.memmap(idx_path, np.int64, "r", offset=off, shape=(n_seq,)) if n_seq else np.zeros(0, np.int64)
    off += 8 * n_seq
    doc_idx = np.memmap(idx_path, np.int64, "r", offset=off, shape=(n_doc,))
    return np.dtype(MEGATRON_DTYPES[code]), lengths, pointers, doc_idx


def megatron_prefixes(path: str, key: str) -> list[str]:
    """The `<prefix>` of each `.bin`/`.idx` pair named by a prefix, either file, or a glob of `.idx` files."""
    p = os.path.expanduser(re.sub(r"\.(bin|idx)$", "", path))
    prefixes = [p] if os.path.isfile(p + ".idx") else \
        [str(f)[:-4] for f in resolve_files(path, key) if str(f).endswith(".idx")]
    if not prefixes:
        raise ValueError(f"{key}={path!r} names no Megatron .idx file; give the prefix of a .bin/.idx pair")
    for pre in prefixes:
        if not os.path.isfile(pre + ".bin"):
            raise ValueError(f"{key}: {pre}.idx has no {pre}.bin next to it")
    return prefixes


def open_tokens(path: Path, dtype: str, key: str) -> np.ndarray:
    """A token file as a read-only memory-mapped 1-D array (`.npy` carries its dtype; `.bin` needs `dtype`)."""
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, EOFError) as err:  # numpy names no file ("mmap length is greater than file size")
            raise DamagedFile(f"{key}: {path} is truncated or not an .npy file ({reason_of(err)}); restore it or "
                              "write it again") from None
        if arr.ndim != 1 or arr.dtype.kind not in "ui":
            raise ValueError(f"{key}: {path} holds {arr.dtype} of shape {arr.shape}; expected a 1-D integer array")
        return arr
    if dtype == "auto":
        raise ValueError(f"{key}.dtype is auto but {path} is a raw token file; set dtype (uint16/uint32/int32)")
    item = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size % item:
        raise ValueError(f"{key}: {path} has {size} bytes, not a multiple of dtype {dtype}'s {item}")
    return np.memmap(path, np.dtype(dtype), "r", shape=(size // item,)) if size else np.zeros(0, dtype)


def source_files(src: SourceConfig, key: str) -> list[tuple[Path, np.ndarray, np.ndarray | None]]:
    """(token file, memory-mapped tokens, document boundaries or None = find them by EOS) per file, in order."""
    if src.kind == "megatron":
        out = []
        for pre in megatron_prefixes(src.path, f"{key}.path"):
            dtype, lengths, pointers, doc_idx = read_megatron_index(Path(pre + ".idx"))
            tokens = open_tokens(Path(pre + ".bin"), dtype.name, key)
            seq_bounds = np.r_[0, np.cumsum(lengths, dtype=np.int64)]
            if not np.array_equal(np.asarray(pointers), seq_bounds[:-1] * dtype.itemsize):
                raise ValueError(f"{key}: {pre}.bin does not hold its sequences back to back; unsupported layout")
            if seq_bounds[-1] != len(tokens) or len(doc_idx) < 1 or doc_idx[0] != 0 or doc_idx[-1] != len(lengths):
                raise ValueError(f"{key}: {pre}.idx does not match {pre}.bin ({len(tokens)} tokens); "
                                 "the pair is truncated or from different writes")
            out.append((Path(pre + ".bin"), tokens, seq_bounds[np.asarray(doc_idx)]))
        return out
    files = resolve_files(src.path, f"{key}.path")
    bad = [str(f) for f in files if f.suffix not in (".npy", ".bin")]
    if bad:
        raise ValueError(f"{key}.path matches files that are not .npy/.bin token files: {bad[:3]}")
    if src.offsets_path and len(files) != 1:
        raise ValueError(f"{key}.offsets_path gives the documents of one token file, but path matches {len(files)}")
    out = []
    for f in files:
        tokens = open_tokens(f, src.dtype, key)
        bounds = None
        if src.offsets_path:
            bounds = np.asarray(np.load(os.path.expanduser(src.offsets_path), mmap_mode="r"), np.int64)
            if (bounds.ndim != 1 or len(bounds) < 1 or bounds[0] != 0 or bounds[-1] != len(tokens)
                    or (np.diff(bounds) < 0).any()):
                raise ValueError(f"{key}.offsets_path={src.offsets_path!r} is not non-decreasing document boundaries "
                                 f"from 0 to {len(tokens)} (the length of {f})")
        out.append((f, tokens, bounds))
    return out


# ---------------------------------------------------------------- the index pass
def unit_hash_array(x: np.ndarray) -> np.ndarray:
    """splitmix64 of integers, mapped to [0, 1): the held-out draw of a document by its index."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def scan_tokens(tokens: np.ndarray, eos_id: int | None, vocab: int, where: str, key: str) -> np.ndarray | None:
    """Check every id is in [0, vocab); return the positions just after each EOS (None if eos_id is None)."""
    ends = []
    for lo in range(0, len(tokens), CHUNK):
        chunk = np.asarray(tokens[lo:lo + CHUNK])
        top, low = int(chunk.max()), int(chunk.min())
        if top >= vocab or low < 0:
            bad = top if top >= vocab else low
            raise ValueError(f"{key}: {where} holds token id {bad}, outside the tokenizer's vocabulary of {vocab} ids; "
                             "these tokens were made with another tokenizer (set data.tokenizer_path) or another dtype")
        if eos_id is not None:
            ends.append(np.flatnonzero(chunk == eos_id) + lo + 1)
    return None if eos_id is None else (np.concatenate(ends) if ends else np.zeros(0, np.int64))


def document_bounds(tokens: np.ndarray, bounds: np.ndarray | None, eos_id: int | None, vocab: int,
                    where: str, key: str) -> np.ndarray:
    """Document boundaries of one token file (checking its ids against the vocabulary on the way)."""
    ends = scan_tokens(tokens, None if bounds is not None else eos_id, vocab, where, key)
    if bounds is not None:
        return bounds
    if len(tokens) and not len(ends):
        raise ValueError(f"{key}.eos_id={eos_id}: no token of {where} ({len(tokens)} tokens) equals it; "
                         "check eos_id (and dtype for raw .bin files)")
    tail = [len(tokens)] if len(tokens) and (not len(ends) or ends[-1] != len(tokens)) else []
    return np.r_[0, ends, tail].astype(np.int64)


def index_key(cfg: DataConfig, src: SourceConfig, tokenizer, key: str) -> dict:
    if src.kind == "megatron":
        files = [Path(p + s) for p in megatron_prefixes(src.path, f"{key}.path") for s in (".idx", ".bin")]
    else:
        files = resolve_files(src.path, f"{key}.path")
        if src.offsets_path:
            files = files + [Path(os.path.expanduser(src.offsets_path))]
    return {"version": INDEX_VERSION, "kind": src.kind, "files": files_fingerprint(files), "eos_id": src.eos_id,
            "offsets": bool(src.offsets_path), "dtype": src.dtype, "heldout_fraction": cfg.heldout_fraction,
            "max_doc_tokens": cfg.max_doc_tokens, "tokenizer": tokenizer_fingerprint(tokenizer)}


def check_eos(src: SourceConfig, tokenizer, key: str) -> None:
    if src.eos_id is not None and src.eos_id != tokenizer.eos_token_id:
        raise ValueError(f"{key}.eos_id={src.eos_id} differs from the tokenizer's eos_token_id="
                         f"{tokenizer.eos_token_id} ({tokenizer.eos_token!r}); the token files were made with "
                         "another tokenizer (set data.tokenizer_path) or eos_id is wrong")


def index_folder(cfg: DataConfig, src: SourceConfig, tokenizer, key: str = "data.sources[]") -> Path:
    """Where the index of a token source is (or will be) cached."""
    h = digest(index_key(cfg, src, tokenizer, key))
    return cache_root(cfg.cache_dir) / "index" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', src.display_name())}-{h}"


def build_index(cfg: DataConfig, src: SourceConfig, tokenizer, key: str = "data.sources[]") -> Path:
    """The cached index folder of a token source (built by one pass over its tokens on first use)."""
    check_eos(src, tokenizer, key)
    folder = index_folder(cfg, src, tokenizer, key)
    vocab = len(tokenizer)

    def build(tmp: Path) -> None:
        stats = {s: S.DataStats() for s in ("train", "heldout")}
        files, first_doc = [], 0
        for j, (path, tokens, bounds) in enumerate(source_files(src, key)):
            bounds = document_bounds(tokens, bounds, src.eos_id, vocab, str(path), key)
            lens = np.diff(bounds)
            held = unit_hash_array(np.arange(first_doc, first_doc + len(lens))) < cfg.heldout_fraction
            first_doc += len(lens)
            for split, sel in (("train", ~held), ("heldout", held)):
                st = stats[split]
                too_long = sel & (lens > cfg.max_doc_tokens) if cfg.max_doc_tokens is not None else sel & False
                for reason, n in ((S.EMPTY, int((sel & (lens == 0)).sum())), (S.TOO_LONG, int(too_long.sum()))):
                    if n:
                        st.skipped[reason] = st.skipped.get(reason, 0) + n
                keep = np.flatnonzero(sel & (lens > 0) & ~too_long)
                np.save(tmp / f"f{j}.{split}.starts.npy", bounds[keep])
                np.save(tmp / f"f{j}.{split}.cum.npy", np.r_[0, np.cumsum(lens[keep])].astype(np.int64))
                st.docs += len(keep)
                st.tokens += int(lens[keep].sum())
                st.loss_tokens += int(lens[keep].sum())
            files.append({"path": str(path), "dtype": tokens.dtype.name, "tokens": len(tokens)})
        (tmp / "meta.json").write_text(json.dumps({"source": src.display_name(), "files": files,
                                                   "stats": {k: v.to_dict() for k, v in stats.items()}}, indent=1))

    return build_once(folder, build)


def load_index(folder: Path, split: str) -> tuple[list[Segment], S.DataStats]:
    """Segments (one per token file) and stats of one split of a built index: maps files, reads no tokens.

    A token file whose size no longer matches the index (truncated after it was indexed) and a damaged index
    file are DamagedFile errors naming the file and what to do."""
    fix = rebuild_hint(folder)
    meta = read_json(folder / "meta.json", fix)
    segments = []
    for j, f in enumerate(meta["files"]):
        path = Path(f["path"])
        dtype = np.dtype(f["dtype"])
        changed = (f"the token file changed after it was indexed into {folder}; restore it, or delete that folder to "
                   "index the file as it is now")
        if path.suffix == ".npy":
            tokens = open_npy(path, changed)
            if len(tokens) != f["tokens"]:
                raise DamagedFile(f"{path} holds {len(tokens):,} tokens where {f['tokens']:,} were indexed; {changed}")
        else:
            tokens = open_raw(path, dtype, f["tokens"], changed)
        segments.append(Segment(tokens, open_npy(folder / f"f{j}.{split}.cum.npy", fix),
                                open_npy(folder / f"f{j}.{split}.starts.npy", fix)))
    return segments, S.DataStats.from_dict(meta["stats"][split])
