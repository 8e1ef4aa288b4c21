"""Rows of all sources as one dataset, and the resumable, rank-sharded, infinite train iterator.

Each source split is stored compactly (data/compact.py: token ids once, document boundaries, loss-mask spans)
and its rows are computed when read, so one prepared source serves every seq_len.

Mixture: an epoch is N draws, N = total train rows of all sources. Source i gets round(N * w_i / sum w)
of them (largest remainder), its rows taken in a shuffled order that repeats (reshuffled) when a small
source is upsampled; the draws are interleaved in a shuffled order. Everything is a function of
(seed, epoch), so weights are exact proportions of rows (= tokens) per epoch, and every epoch
reshuffles deterministically.

Sharding: global step t uses rows order[t*G:(t+1)*G], G = batch_size * world_size; rank r takes the
contiguous chunk [r*B:(r+1)*B]. The rows left over at an epoch's end (N mod G) are skipped for that
epoch. The position (epoch, step) is all that is needed to resume, and since it counts global steps a
run can resume with another world size as long as the global batch is unchanged.
"""
from dataclasses import dataclass

import numpy as np
import torch

from ar2diff.config.data import DataConfig

from .compact import TokenRows
from .prepare import SPLITS, check_inline, load_source
from .stats import DataStats


def mixture_order(sizes: list[int], weights: list[float], seed: int, epoch: int) -> np.ndarray:
    """Global row indices (int64, length sum(sizes)) of one epoch of the weighted mixture."""
    N, k = int(sum(sizes)), len(sizes)
    quota = np.asarray(weights, float) / float(sum(weights)) * N
    counts = np.floor(quota).astype(np.int64)
    counts[np.argsort(-(quota - counts), kind="stable")[: N - counts.sum()]] += 1
    rng = np.random.default_rng([seed, epoch])
    labels = np.repeat(np.arange(k), counts)
    rng.shuffle(labels)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    order = np.empty(N, np.int64)
    for i in range(k):
        if counts[i] == 0:
            continue
        passes = -(-counts[i] // sizes[i])
        perm = np.concatenate([np.random.default_rng([seed, epoch, i, p]).permutation(sizes[i])
                               for p in range(passes)])
        order[labels == i] = offsets[i] + perm[: counts[i]]
    return order


class PackedDataset:
    """The rows of one split over all sources (computed from memory-mapped compact storage), addressed by a
    global index: source 0's rows first, then source 1's, ..."""

    def __init__(self, parts: list[TokenRows], names: list[str], weights: list[float], seq_len: int):
        self.parts, self.names, self.weights, self.seq_len = parts, names, weights, seq_len
        self.stats = {n: p.stats for n, p in zip(names, parts)}
        self.sizes = [len(p) for p in parts]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def total_stats(self) -> DataStats:
        total = DataStats()
        for s in self.stats.values():
            total = total.merge(s)
        return total

    def rows(self, indices) -> dict[str, torch.Tensor]:
        """Rows at global `indices` as (B, S) tensors: input_ids/position_ids int64, doc_ids int32, loss_mask bool."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range [0, {len(self)})")
        B, S = len(idx), self.seq_len
        out = {"input_ids": np.zeros((B, S), np.int64), "doc_ids": np.full((B, S), -1, np.int32),
               "position_ids": np.zeros((B, S), np.int64), "loss_mask": np.zeros((B, S), bool)}
        part_of = np.searchsorted(self.offsets, idx, side="right") - 1
        for p in np.unique(part_of):
            where = np.nonzero(part_of == p)[0]
            got = self.parts[p].rows(idx[where] - self.offsets[p])
            for k in out:
                out[k][where] = got[k]
        return {k: torch.from_numpy(v) for k, v in out.items()}


class TrainBatches:
    """Infinite iterator of this rank's (B, S) batches, resumable with state_dict()/load_state_dict()."""

    def __init__(self, data: PackedDataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        empty = [n for n, s in zip(data.names, data.sizes) if s == 0]
        if empty:
            raise ValueError(f"data sources {empty} have no train rows (every record skipped or held out); "
                             "check the source's stats, path and fields, or remove it")
        self.data, self.batch_size, self.seed, self.rank = data, batch_size, seed, rank
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = len(data) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size*world_size={self.global_batch} rows exceeds the {len(data)} train rows; "
                             "lower batch_size or data.seq_len, or add data")
        self.epoch, self.step = 0, 0
        self._order, self._order_epoch = None, -1

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            self._order = mixture_order(self.data.sizes, self.data.weights, self.seed, self.epoch)
            self._order_epoch = self.epoch
        start = self.step * self.global_batch + self.rank * self.batch_size
        batch = self.data.rows(self._order[start:start + self.batch_size])
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        """Position of the next batch, plus what must match on resume."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "global_batch": self.global_batch,
                "num_rows": len(self.data), "weights": list(self.data.weights)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "global_batch", "num_rows", "weights"):
            if state[key] != self.state_dict()[key]:
                raise ValueError(f"data state mismatch: saved {key}={state[key]!r}, now {self.state_dict()[key]!r}; "
                                 "resume with the same data config, seed and global batch size")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


@dataclass
class DataLoaders:
    train: TrainBatches
    heldout: PackedDataset


def prepare_data(cfg: DataConfig, tokenizer) -> None:
    """Prepare (tokenize into compact files) or index every source that needs it. Run on one rank, then barrier.

    Raises first if a source is too large to prepare here (see prepare.check_inline): run
    `python -m ar2diff.data.prepare` for it before training.
    """
    cfg.validate()
    check_inline(cfg, tokenizer)
    for i, src in enumerate(cfg.sources):
        load_source(cfg, src, tokenizer, f"data.sources[{i}]", "train")


def load_packed(cfg: DataConfig, tokenizer, split: str) -> PackedDataset:
    """The rows of `split` ("train" or "heldout") of all sources, preparing sources that are missing."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    parts = []
    for i, src in enumerate(cfg.sources):
        segments, stats = load_source(cfg, src, tokenizer, f"data.sources[{i}]", split)
        parts.append(TokenRows(segments, cfg.seq_len, tokenizer.pad_token_id, stats))
    return PackedDataset(parts, [s.display_name() for s in cfg.sources], [s.weight for s in cfg.sources],
                         cfg.seq_len)


def build_dataloaders(cfg: DataConfig, tokenizer, batch_size: int, rank: int = 0,
                      world_size: int = 1) -> DataLoaders:
    """Train iterator for this rank (see module docstring for sharding) and the held-out rows.

    Prepares missing sources itself; with several ranks, call prepare_data on rank 0 (per node without a
    shared filesystem) and barrier first, or every rank tokenizes (correct, since prepared folders appear
    atomically, but wasteful). Large sources are prepared before training with `python -m ar2diff.data.prepare`.
    """
    train = TrainBatches(load_packed(cfg, tokenizer, "train"), batch_size, cfg.seed, rank, world_size)
    return DataLoaders(train=train, heldout=load_packed(cfg, tokenizer, "heldout"))


def heldout_rows(cfg: DataConfig, tokenizer, max_rows: int | None = None) -> dict[str, torch.Tensor]:
    """The first max_rows (all if None) packed held-out rows, sources in config order, as (N, S) tensors."""
    data = load_packed(cfg, tokenizer, "heldout")
    n = len(data) if max_rows is None else min(max_rows, len(data))
    return data.rows(np.arange(n))
