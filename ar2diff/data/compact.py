"""Compact token storage and the rows computed from it when they are read.

A split of a source is a list of segments (one per prepared shard or token file). A segment stores:
  tokens  the token ids once, memory-mapped (uint16 when the vocabulary fits, else uint32)
  cum     int64 document boundaries in the segment's token stream (cum[0] = 0, cum[-1] = its length)
  starts  int64 file offset of each document, or None when the documents lie back to back in the file
          (prepared shards); a token file whose held-out documents are left out has gaps
  spans   int64 (K, 2) [start, end) stream ranges where the loss mask is True (SFT responses), or None: all True
The split's stream is its segments one after another; row r is stream[r*S:(r+1)*S]. Doc ids, position ids
and the loss mask of a row are computed here, with the same meaning as packing.rows_from_stream: documents
never span segments, a document cut at a row end continues in the next row as doc id 0 with positions from 0,
and only the split's last row is padded (doc id -1, position 0, loss mask False).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from . import stats as S


@dataclass
class Segment:
    tokens: np.ndarray
    cum: np.ndarray
    starts: np.ndarray | None = None
    spans: np.ndarray | None = None

    @property
    def length(self) -> int:
        return int(self.cum[-1])

    def read(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids int64, is_doc_start bool, loss_mask bool) of stream positions [a, b), 0 <= a < b <= length."""
        cum = self.cum
        d0 = int(np.searchsorted(cum, a, side="right")) - 1
        d1 = int(np.searchsorted(cum, b, side="left"))
        if self.starts is None:
            ids = np.asarray(self.tokens[a:b], np.int64)
        else:
            lo = np.maximum(cum[d0:d1], a)
            hi = np.minimum(cum[d0 + 1:d1 + 1], b)
            file_lo = self.starts[d0:d1] + (lo - cum[d0:d1])
            run_start = np.r_[True, file_lo[1:] != file_lo[:-1] + (hi - lo)[:-1]]  # merge back-to-back docs
            first = np.flatnonzero(run_start)
            ends = np.r_[first[1:], len(lo)]
            ids = np.concatenate([np.asarray(self.tokens[file_lo[i]:file_lo[i] + hi[j - 1] - lo[i]], np.int64)
                                  for i, j in zip(first, ends)])
        is_start = np.zeros(b - a, bool)
        is_start[0] = True
        is_start[cum[d0 + 1:d1] - a] = True
        if self.spans is None:
            mask = np.ones(b - a, bool)
        else:
            j0 = int(np.searchsorted(self.spans[:, 1], a, side="right"))
            j1 = int(np.searchsorted(self.spans[:, 0], b, side="left"))
            delta = np.zeros(b - a + 1, np.int64)
            sp = np.clip(np.asarray(self.spans[j0:j1]) - a, 0, b - a)
            np.add.at(delta, sp[:, 0], 1)
            np.add.at(delta, sp[:, 1], -1)
            mask = np.cumsum(delta[:-1]) > 0
        return ids, is_start, mask


class TokenRows:
    """Fixed-length rows over the stream of a split's segments; `rows(local indices)` -> dict of numpy arrays."""

    def __init__(self, segments: list[Segment], seq_len: int, pad_id: int, stats: S.DataStats):
        self.segments = [s for s in segments if s.length > 0]
        self.seq_len, self.pad_id = seq_len, pad_id
        self.seg_offsets = np.cumsum([0] + [s.length for s in self.segments]).astype(np.int64)
        self.num_tokens = int(self.seg_offsets[-1])
        self.stats = S.DataStats(**{**stats.to_dict(), "rows": len(self), "pad_tokens": len(self) * seq_len
                                    - self.num_tokens})

    def __len__(self) -> int:
        return -(-self.num_tokens // self.seq_len)

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, doc_ids, position_ids, loss_mask) of row r."""
        S_, a = self.seq_len, r * self.seq_len
        b = min(a + S_, self.num_tokens)
        parts = []
        k = int(np.searchsorted(self.seg_offsets, a, side="right")) - 1
        while a < b:
            seg, off = self.segments[k], int(self.seg_offsets[k])
            end = min(b, off + seg.length)
            parts.append(seg.read(a - off, end - off))
            a, k = end, k + 1
        ids, is_start, mask = (np.concatenate(x) for x in zip(*parts))
        n, idx = len(ids), np.arange(len(ids))
        doc = np.cumsum(is_start) - 1
        pos = idx - np.maximum.accumulate(np.where(is_start, idx, 0))
        if n < S_:
            pad = S_ - n
            ids, doc = np.r_[ids, np.full(pad, self.pad_id, np.int64)], np.r_[doc, np.full(pad, -1)]
            pos, mask = np.r_[pos, np.zeros(pad, np.int64)], np.r_[mask, np.zeros(pad, bool)]
        return ids, doc.astype(np.int32), pos, mask

    def rows(self, indices) -> dict[str, np.ndarray]:
        idx = [int(i) for i in np.asarray(indices).reshape(-1)]
        if idx and (min(idx) < 0 or max(idx) >= len(self)):
            raise IndexError(f"row index out of range [0, {len(self)})")
        got = [self.row(r) for r in idx]
        S_ = self.seq_len
        if not got:
            return {"input_ids": np.zeros((0, S_), np.int64), "doc_ids": np.zeros((0, S_), np.int32),
                    "position_ids": np.zeros((0, S_), np.int64), "loss_mask": np.zeros((0, S_), bool)}
        return {k: np.stack([g[j] for g in got]) for j, k in
                enumerate(("input_ids", "doc_ids", "position_ids", "loss_mask"))}


# ---------------------------------------------------------------- storage of prepared splits
def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def mask_spans(mask: np.ndarray, offset: int) -> np.ndarray:
    """(K, 2) [start, end) runs of True in `mask`, shifted by offset."""
    edge = np.diff(np.r_[0, mask.astype(np.int8), 0])
    return np.stack([np.flatnonzero(edge == 1), np.flatnonzero(edge == -1)], axis=1).astype(np.int64) + offset


def write_split(tokenized, folder: Path, split: str, dtype: np.dtype, chat: bool,
                batch_docs: int = 4096, progress=None) -> S.DataStats:
    """Stream a tokenized `datasets.Dataset` (input_ids, loss_mask, reason) into `<split>.tokens.bin`,
    `<split>.docs.npy` (boundaries), `<split>.spans.npy` (chat only) and `<split>.json` (dtype, stats)."""
    stats, lengths, spans, n = S.DataStats(), [np.zeros(1, np.int64)], [], 0
    with open(folder / f"{split}.tokens.bin", "wb") as f:
        for tbl in tokenized.with_format("arrow").iter(batch_size=batch_docs):
            for item in pc.value_counts(tbl.column("reason")).to_pylist():
                if item["values"]:
                    stats.skipped[item["values"]] = stats.skipped.get(item["values"], 0) + item["counts"]
            ids_col = tbl.column("input_ids").combine_chunks()
            ids = ids_col.flatten().to_numpy(zero_copy_only=False)
            lens = pc.list_value_length(ids_col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
            f.write(ids.astype(dtype).tobytes())
            lengths.append(lens[lens > 0])
            mask = tbl.column("loss_mask").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            if chat:
                spans.append(mask_spans(mask, n))
            stats.docs += int((lens > 0).sum())
            stats.tokens += len(ids)
            stats.loss_tokens += int(mask.sum())
            n += len(ids)
            if progress is not None:
                progress.update(len(ids))
    np.save(folder / f"{split}.docs.npy", np.cumsum(np.concatenate(lengths)))
    if chat:
        np.save(folder / f"{split}.spans.npy", np.concatenate(spans) if spans else np.zeros((0, 2), np.int64))
    (folder / f"{split}.json").write_text(json.dumps({"dtype": dtype.name, "stats": stats.to_dict()}, indent=1))
    return stats


class DamagedFile(ValueError):
    """A cache or token file that is truncated or unreadable. Its message is one line naming the file and what to
    do; a ValueError, so every command line reports it as a user error, without a traceback."""


def reason_of(err: BaseException) -> str:
    """The first line of an error's text (numpy's "mmap length is greater than file size", say)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def read_json(path: Path, fix: str) -> dict:
    """A JSON file of a cache folder, or a DamagedFile naming it and `fix` (what to do)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise DamagedFile(f"{path} is missing or damaged ({reason_of(err)}); {fix}") from None


def open_npy(path: Path, fix: str) -> np.ndarray:
    """A `.npy` file memory-mapped, or a DamagedFile naming it and `fix` when it is missing, truncated or not an
    `.npy` file (numpy would say "mmap length is greater than file size", naming no file)."""
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as err:
        raise DamagedFile(f"{path} is missing, truncated or damaged ({reason_of(err)}); {fix}") from None


def open_raw(path: Path, dtype: np.dtype, n: int, fix: str) -> np.ndarray:
    """`n` items of `dtype` memory-mapped from a raw file that must hold exactly that many bytes, else a
    DamagedFile naming the file, its size, the size expected and `fix`."""
    dtype = np.dtype(dtype)
    try:
        size = Path(path).stat().st_size
    except OSError as err:
        raise DamagedFile(f"{path} is missing ({reason_of(err)}); {fix}") from None
    if size != n * dtype.itemsize:
        raise DamagedFile(f"{path} holds {size:,} bytes where {n:,} {dtype.name} tokens take "
                          f"{n * dtype.itemsize:,}: it is truncated or was changed; {fix}")
    return np.memmap(path, dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)


def rebuild_hint(folder: Path) -> str:
    """What to do about a damaged file of a prepared shard or index folder: it is rebuilt when it is missing."""
    return f"delete {folder} and re-run the same command to prepare it again"


def load_split(folder: Path, split: str) -> tuple[Segment, S.DataStats]:
    """The memory-mapped segment and stats of one split of a prepared shard folder. A truncated or damaged file
    is a DamagedFile naming it (and the folder to delete), not numpy's error."""
    fix = rebuild_hint(folder)
    meta = read_json(folder / f"{split}.json", fix)
    cum = open_npy(folder / f"{split}.docs.npy", fix)
    dtype = np.dtype(meta["dtype"])
    n = int(cum[-1]) if len(cum) else 0
    tokens = open_raw(folder / f"{split}.tokens.bin", dtype, n, fix)
    spans_file = folder / f"{split}.spans.npy"
    spans = open_npy(spans_file, fix) if spans_file.exists() else None
    return Segment(tokens, cum, None, spans), S.DataStats.from_dict(meta["stats"])
