"""Tokenize documents and pack them into fixed-length rows that keep document boundaries.

Each document's tokens get EOS appended (chat: unless the rendered conversation already ends with EOS),
and the token stream of a source split is cut into rows of `seq_len` tokens. Per row (shape (S,)):
  input_ids     token ids
  doc_ids       0, 1, 2, ... per document in the row; a document cut at a row end continues in the next
                row under a new doc id (0 there). Padding has doc id -1.
  position_ids  0 at each document start in the row (also for a continued document), +1 per token
  loss_mask     True on tokens that may be prediction targets: every real token in pre-training,
                assistant tokens (incl. end-of-turn) in SFT; False on padding.
Rows are never padded except the very last row of each source split. The TiDAR mask uses doc_ids
so attention never crosses documents; the AR loss must also skip targets whose doc id differs.
"""
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import stats as S
from .cache import build_once, cache_root, digest, tokenizer_fingerprint
from .config import DataConfig, SourceConfig
from .sft import TemplateError, encode_chat
from .sources import read_records, select_split, source_fingerprint

PIPELINE_VERSION = 1  # bump when packing or tokenization changes, to invalidate caches
SPLITS = ("train", "heldout")
ROW_COLUMNS = {"input_ids": pa.int32(), "doc_ids": pa.int32(), "position_ids": pa.int32(), "loss_mask": pa.bool_()}
TOKENIZED_FEATURES = datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                        "loss_mask": datasets.List(datasets.Value("bool")),
                                        "reason": datasets.Value("string")})


# ---------------------------------------------------------------- tokenization
def tokenize_batch(batch: dict, tokenizer, chat: bool, max_doc_tokens: int | None) -> dict:
    """Batched `datasets.map` function: normalized records -> input_ids, loss_mask, reason."""
    eos = tokenizer.eos_token_id
    reasons = list(batch["reason"])
    good = [i for i, r in enumerate(reasons) if not r]
    out_ids: list[list[int]] = [[] for _ in reasons]
    out_mask: list[list[bool]] = [[] for _ in reasons]
    if chat:
        for i in good:
            try:
                ids, mask = encode_chat(tokenizer, batch["messages"][i])
            except TemplateError:
                reasons[i] = S.TEMPLATE_ERROR
                continue
            if not ids or ids[-1] != eos:
                ids, mask = ids + [eos], mask + [False]  # separator, not part of any response
            out_ids[i], out_mask[i] = ids, mask
    elif good:
        # split_special_tokens: a literal "<|eos|>" inside a document is text, not a control token.
        enc = tokenizer([batch["text"][i] for i in good], add_special_tokens=False, split_special_tokens=True)
        for i, ids in zip(good, enc["input_ids"]):
            out_ids[i], out_mask[i] = list(ids) + [eos], [True] * (len(ids) + 1)
    for i in good:
        if reasons[i]:
            continue
        if max_doc_tokens is not None and len(out_ids[i]) > max_doc_tokens:
            reasons[i], out_ids[i], out_mask[i] = S.TOO_LONG, [], []
    return {"input_ids": out_ids, "loss_mask": out_mask, "reason": reasons}


def tokenize_records(ds: datasets.Dataset, tokenizer, chat: bool, max_doc_tokens: int | None,
                     fingerprint: str, desc: str) -> datasets.Dataset:
    return ds.map(tokenize_batch, batched=True, batch_size=256, remove_columns=ds.column_names,
                  features=TOKENIZED_FEATURES, new_fingerprint=fingerprint, desc=desc,
                  fn_kwargs={"tokenizer": tokenizer, "chat": chat, "max_doc_tokens": max_doc_tokens})


# ---------------------------------------------------------------- packing (pure)
def rows_from_stream(ids_T: np.ndarray, mask_T: np.ndarray, doc_T: np.ndarray, seq_len: int) -> dict:
    """Cut a stream whose length is a multiple of seq_len into rows. doc_T: global document index per
    token, -1 on padding. Returns int32/bool arrays of shape (R, seq_len)."""
    R = len(ids_T) // seq_len
    assert R * seq_len == len(ids_T), "stream length must be a multiple of seq_len"
    doc_RS = doc_T.reshape(R, seq_len)
    is_start_RS = np.ones((R, seq_len), dtype=bool)
    is_start_RS[:, 1:] = doc_RS[:, 1:] != doc_RS[:, :-1]
    idx_RS = np.broadcast_to(np.arange(seq_len), (R, seq_len))
    start_RS = np.maximum.accumulate(np.where(is_start_RS, idx_RS, 0), axis=1)
    pad_RS = doc_RS < 0
    return {
        "input_ids": ids_T.reshape(R, seq_len).astype(np.int32),
        "doc_ids": np.where(pad_RS, -1, np.cumsum(is_start_RS, axis=1) - 1).astype(np.int32),
        "position_ids": np.where(pad_RS, 0, idx_RS - start_RS).astype(np.int32),
        "loss_mask": mask_T.reshape(R, seq_len).astype(bool) & ~pad_RS,
    }


def pack_documents(docs: Iterable[tuple[list[int], list[bool]]], seq_len: int, pad_id: int,
                   chunk_tokens: int = 1 << 22) -> Iterator[dict]:
    """Stream (ids, loss_mask) documents into packed row blocks (dicts of (R, S) arrays).

    Only the last block's last row is padded. Memory stays bounded by about chunk_tokens.
    """
    buf_ids, buf_mask, buf_doc, n_buf, doc = [], [], [], 0, 0
    for ids, mask in docs:
        if len(ids):
            buf_ids.append(np.asarray(ids, np.int64))
            buf_mask.append(np.asarray(mask, bool))
            buf_doc.append(np.full(len(ids), doc, np.int64))
            n_buf += len(ids)
        doc += 1
        if n_buf >= chunk_tokens:
            ids_T, mask_T, doc_T = (np.concatenate(b) for b in (buf_ids, buf_mask, buf_doc))
            cut = len(ids_T) // seq_len * seq_len
            yield rows_from_stream(ids_T[:cut], mask_T[:cut], doc_T[:cut], seq_len)
            buf_ids, buf_mask, buf_doc, n_buf = [ids_T[cut:]], [mask_T[cut:]], [doc_T[cut:]], len(ids_T) - cut
    if n_buf:
        pad = (-n_buf) % seq_len
        ids_T = np.concatenate(buf_ids + [np.full(pad, pad_id, np.int64)])
        mask_T = np.concatenate(buf_mask + [np.zeros(pad, bool)])
        doc_T = np.concatenate(buf_doc + [np.full(pad, -1, np.int64)])
        yield rows_from_stream(ids_T, mask_T, doc_T, seq_len)


# ---------------------------------------------------------------- on-disk rows
def iter_tokenized(ds: datasets.Dataset, batch_docs: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, mask) per record of a tokenized dataset, in order (skipped records give empty arrays)."""
    for tbl in ds.with_format("arrow").iter(batch_size=batch_docs):
        ids_col = tbl.column("input_ids").combine_chunks()
        mask_col = tbl.column("loss_mask").combine_chunks()
        ids_flat = ids_col.flatten().to_numpy(zero_copy_only=False)
        mask_flat = mask_col.flatten().to_numpy(zero_copy_only=False)
        ends = np.cumsum(pc.list_value_length(ids_col).fill_null(0).to_numpy(zero_copy_only=False))
        starts = ends - np.diff(ends, prepend=0)
        for s, e in zip(starts, ends):
            yield ids_flat[s:e], mask_flat[s:e]


def write_rows(path: Path, blocks: Iterable[dict], seq_len: int) -> tuple[int, int]:
    """Write row blocks as an Arrow stream file (fixed-size list columns); return (rows, padding tokens)."""
    schema = pa.schema([(k, pa.list_(t, seq_len)) for k, t in ROW_COLUMNS.items()])
    rows = pad = 0
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, schema) as writer:
        for block in blocks:
            arrays = [pa.FixedSizeListArray.from_arrays(pa.array(block[k].ravel(), type=t), seq_len)
                      for k, t in ROW_COLUMNS.items()]
            writer.write_batch(pa.record_batch(arrays, schema=schema))
            rows += len(block["input_ids"])
            pad += int((block["doc_ids"] < 0).sum())
    return rows, pad


def split_stats(tokenized: datasets.Dataset, batch_docs: int = 4096) -> S.DataStats:
    """Kept docs/tokens and skipped-by-reason counts of a tokenized split (one streaming pass)."""
    stats = S.DataStats()
    for tbl in tokenized.with_format("arrow").iter(batch_size=batch_docs):
        for item in pc.value_counts(tbl.column("reason")).to_pylist():
            if item["values"]:
                stats.skipped[item["values"]] = stats.skipped.get(item["values"], 0) + item["counts"]
            else:
                stats.docs += item["counts"]
        stats.tokens += int(pc.sum(pc.list_value_length(tbl.column("input_ids"))).as_py() or 0)
        mask = pc.list_flatten(tbl.column("loss_mask"))
        stats.loss_tokens += int(pc.sum(pc.cast(mask, pa.int64())).as_py() or 0)
    return stats


# ---------------------------------------------------------------- one source, cached
def _key_inputs(cfg: DataConfig, src: SourceConfig, tokenizer, key: str) -> dict:
    """Everything that changes a source's tokens or rows, and nothing else (not its weight or name)."""
    fields = {k: getattr(src, k) for k in ("kind", "path", "format", "text_field", "messages_field", "split",
                                          "sample_by", "max_docs")}
    return {"version": PIPELINE_VERSION, "source": fields, "content": source_fingerprint(src, key),
            "seq_len": cfg.seq_len, "chat": cfg.chat, "max_doc_tokens": cfg.max_doc_tokens,
            "heldout_fraction": cfg.heldout_fraction, "tokenizer": tokenizer_fingerprint(tokenizer)}


def build_packed_source(cfg: DataConfig, src: SourceConfig, tokenizer, key: str = "data.sources[]") -> Path:
    """Folder with `<split>.arrow` packed rows and `<split>.stats.json` for train and heldout; built once.

    A second call with the same config, source content and tokenizer reads the folder, no re-tokenizing.
    The tokenized documents are also cached (datasets files under <cache_dir>/hf, safe to delete), keyed
    without seq_len, so another sequence length (context extension) re-packs without re-tokenizing.
    """
    name = src.display_name()
    inputs = _key_inputs(cfg, src, tokenizer, key)
    h = digest(inputs)
    tok_key = digest({k: v for k, v in inputs.items() if k != "seq_len"})  # a new seq_len only re-packs
    folder = cache_root(cfg.cache_dir) / "packed" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{h}"

    def build(tmp: Path) -> None:
        records = read_records(src, cfg, key)
        for split in SPLITS:
            part = select_split(records, cfg.heldout_fraction, split)
            tok = tokenize_records(part, tokenizer, cfg.chat, cfg.max_doc_tokens, f"{tok_key}-{split}-tok",
                                   f"tokenize {name}/{split}")
            stats = split_stats(tok)
            stats.rows, stats.pad_tokens = write_rows(
                tmp / f"{split}.arrow", pack_documents(iter_tokenized(tok), cfg.seq_len, tokenizer.pad_token_id),
                cfg.seq_len)
            (tmp / f"{split}.stats.json").write_text(json.dumps(stats.to_dict(), indent=1))
        (tmp / "meta.json").write_text(json.dumps({"source": name, "key": h, "seq_len": cfg.seq_len}, indent=1))

    return build_once(folder, build)


def load_split(folder: Path, split: str) -> tuple[datasets.Dataset, S.DataStats]:
    """Memory-mapped packed rows (numpy format) and stats of one split of a built source folder."""
    ds = datasets.Dataset.from_file(str(folder / f"{split}.arrow")).with_format("numpy")
    return ds, S.DataStats.from_dict(json.loads((folder / f"{split}.stats.json").read_text()))
