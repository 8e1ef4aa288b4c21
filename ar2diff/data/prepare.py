"""`python -m ar2diff.data.prepare <data overrides> num_proc=N [shard=i/n]`: tokenize before training.

Text and chat sources are tokenized with `datasets.map(num_proc=N)` into the compact format (data/compact.py)
under `<cache_dir>/prepared/<source>-<key>/of-<n>/shard-<i>/`. Shard i of n holds a contiguous part of the
source (its i-th share of the files when there are at least n files, else of the records), so the n shards
one after another are exactly the one-process result, and n nodes can each run one shard before training.
Token sources (kind=tokens/megatron) get their one-time index pass (data/tokenfile.py) on shard 0.
The key is everything that changes the tokens (source, content, tokenizer, held-out fraction, chat,
max_doc_tokens) and not seq_len: rows are cut when read, so every sequence length reuses the same files.

The trainer reads complete prepared shards when present; otherwise it prepares small sources itself (one
shard, data.num_proc processes) and refuses sources over data.max_inline_bytes, naming this command.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path

import datasets
from omegaconf.errors import OmegaConfBaseException

from ar2diff.config.compose import compose
from ar2diff.config.data import TOKEN_KINDS, DataConfig, SourceConfig
from ar2diff.config.hydra_errors import hydra_error_line
from ar2diff.data.tokenfile import build_index, index_folder, load_index, source_files
from ar2diff.data.tokenizer import resolve_tokenizer
from ar2diff.fs import DiskFull

from . import packing
from . import stats as S
from .cache import build_once, cache_root, digest, tokenizer_fingerprint
from .compact import Segment, load_split, token_dtype, write_split
from .sources import (
    STDLIB_DOCS,
    read_records,
    resolve_files,
    select_split,
    source_fingerprint,
    stdlib_files,
    stdlib_root,
)

log = logging.getLogger(__name__)
PREPARE_VERSION = 2  # bump when tokenization or the stored format changes, to invalidate prepared data
SPLITS = ("train", "heldout")
TOKEN_READ_FACTOR = 32  # an index pass reads token files ~this much faster than a process tokenizes text


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def prepared_root(cfg: DataConfig, src: SourceConfig, tokenizer, key: str) -> Path:
    """Folder of a text source's prepared shards; its name holds the digest of what changes the tokens."""
    fields = {k: getattr(src, k) for k in ("kind", "path", "format", "text_field", "messages_field", "split",
                                          "sample_by", "max_docs")}
    h = digest({"version": PREPARE_VERSION, "source": fields, "content": source_fingerprint(src, key),
                "chat": cfg.chat, "max_doc_tokens": cfg.max_doc_tokens, "heldout_fraction": cfg.heldout_fraction,
                "tokenizer": tokenizer_fingerprint(tokenizer)})
    return cache_root(cfg.cache_dir) / "prepared" / f"{_safe(src.display_name())}-{h}"


def shard_folder(root: Path, i: int, n: int) -> Path:
    return root / f"of-{n}" / f"shard-{i}"


def complete_shards(root: Path) -> list[Path] | None:
    """The shard folders of the first complete set (fewest shards first), or None."""
    sets = sorted((int(d.name[3:]), d) for d in root.glob("of-*") if d.name[3:].isdigit()) if root.is_dir() else []
    for n, d in sets:
        folders = [d / f"shard-{i}" for i in range(n)]
        if all(f.is_dir() for f in folders):
            return folders
    return None


def missing_shards(root: Path) -> str:
    """What a partly prepared source lacks, for error messages ("" if nothing was started)."""
    parts = []
    for d in sorted(root.glob("of-*")) if root.is_dir() else []:
        n = int(d.name[3:])
        missing = [i for i in range(n) if not (d / f"shard-{i}").is_dir()]
        if missing:
            parts.append(f"shards {missing} of {n} are missing (run shard=i/{n} for each)")
    return "; ".join(parts)


def shard_records(cfg: DataConfig, src: SourceConfig, key: str, i: int, n: int) -> datasets.Dataset:
    """Records of shard i of n: a contiguous share of the files (when there are >= n), else of the records."""
    if n > 1 and src.kind == "files" and src.max_docs is None:
        files = resolve_files(src.path, f"{key}.path")
        if len(files) >= n:
            return read_records(src, cfg, key, files=files[i * len(files) // n:(i + 1) * len(files) // n])
    records = read_records(src, cfg, key)
    return records.shard(n, i, contiguous=True) if n > 1 else records


def prepare_shard(cfg: DataConfig, src: SourceConfig, tokenizer, key: str, i: int = 0, n: int = 1,
                  num_proc: int = 1) -> tuple[Path, bool]:
    """Tokenize shard i of n of a text/chat source into compact files (once); (folder, whether built now)."""
    root = prepared_root(cfg, src, tokenizer, key)
    folder = shard_folder(root, i, n)
    if folder.is_dir():
        return folder, False
    if num_proc > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dtype, name = token_dtype(len(tokenizer)), src.display_name()
    fp = digest([root.name, i, n])

    def build(tmp: Path) -> None:
        records = shard_records(cfg, src, key, i, n)
        for split in SPLITS:
            part = select_split(records, cfg.heldout_fraction, split)
            tok = packing.tokenize_records(part, tokenizer, cfg.chat, cfg.max_doc_tokens, f"{fp}-{split}-tok",
                                           f"tokenize {name}/{split} (shard {i}/{n})", num_proc=num_proc)
            write_split(tok, tmp, split, dtype, cfg.chat)
            for f in map_output_files(tok, part):  # the compact files replace the intermediate
                os.remove(f)

    build_once(folder, build)
    return folder, True


def map_output_files(result: datasets.Dataset, source: datasets.Dataset) -> list[str]:
    """The files that `source.map(...)` wrote for `result`: its cache files that `source` does not use itself (map
    names them `cache-<fingerprint>*.arrow`). On an empty `source`, map writes nothing and returns a dataset backed by
    the source's own arrow file, which every later prepare of that source (another tokenizer, held-out fraction,
    max_doc_tokens) reads again: it must never be deleted."""
    used = {os.path.abspath(c["filename"]) for c in source.cache_files}
    written = {os.path.abspath(c["filename"]) for c in result.cache_files} - used
    return sorted(f for f in written if os.path.basename(f).startswith("cache-") and os.path.exists(f))


def source_bytes(src: SourceConfig, key: str) -> int:
    """Bytes a source would make the trainer process inline (text: to tokenize; token files: to index)."""
    if src.kind in ("stdlib", "stdlib_chat"):
        return sum((stdlib_root() / r).stat().st_size for r in stdlib_files(src.path))
    if src.kind == "stdlib_docs":
        return (stdlib_root() / STDLIB_DOCS).stat().st_size
    if src.kind == "files":
        return sum(f.stat().st_size for f in resolve_files(src.path, f"{key}.path"))
    if src.kind in TOKEN_KINDS:
        return sum(t.nbytes for _, t, _ in source_files(src, key)) // TOKEN_READ_FACTOR
    return 0  # hub: size unknown before download


def check_inline(cfg: DataConfig, tokenizer) -> None:
    """Raise (on every rank, before any waits) if a source is not prepared and too large to prepare inline."""
    for i, src in enumerate(cfg.sources):
        key = f"data.sources[{i}]"
        if src.kind in TOKEN_KINDS:
            if index_folder(cfg, src, tokenizer, key).is_dir():
                continue
        else:
            root = prepared_root(cfg, src, tokenizer, key)
            if complete_shards(root) is not None:
                continue
        size = source_bytes(src, key)
        if size > cfg.max_inline_bytes:
            more = missing_shards(root) if src.kind not in TOKEN_KINDS else ""
            raise ValueError(f"{key} ({src.display_name()!r}) is not prepared and is too large to prepare while ranks "
                             f"wait ({size:,} > data.max_inline_bytes={cfg.max_inline_bytes:,} bytes"
                             f"{'; ' + more if more else ''}); run `python -m ar2diff.data.prepare <the same data "
                             "overrides> num_proc=<cores> [shard=i/n]` first (README: staging a cluster run)")


def load_source(cfg: DataConfig, src: SourceConfig, tokenizer, key: str, split: str) -> tuple[list[Segment],
                                                                                             S.DataStats]:
    """Segments and stats of one split of a source, preparing or indexing it first if needed."""
    if src.kind in TOKEN_KINDS:
        return load_index(build_index(cfg, src, tokenizer, key), split)
    folders = complete_shards(prepared_root(cfg, src, tokenizer, key))
    if folders is None:
        folders = [prepare_shard(cfg, src, tokenizer, key, 0, 1, cfg.num_proc)[0]]
    segments, stats = [], S.DataStats()
    for f in folders:
        seg, st = load_split(f, split)
        segments.append(seg)
        stats = stats.merge(st)
    return segments, stats


def prepare_all(cfg: DataConfig, tokenizer, num_proc: int = 1, shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Prepare shard `shard` of every text source (and index token sources on shard 0); one report per source."""
    i, n = shard
    report = []
    for j, src in enumerate(cfg.sources):
        key, t0 = f"data.sources[{j}]", time.time()
        if src.kind in TOKEN_KINDS:
            if i != 0:
                continue
            folder = build_index(cfg, src, tokenizer, key)
            stats = [load_index(folder, s)[1] for s in SPLITS]
            what = "index"
        else:
            folder, built = prepare_shard(cfg, src, tokenizer, key, i, n, num_proc)
            stats = [load_split(folder, s)[1] for s in SPLITS]
            what = f"shard {i}/{n}" + ("" if built else " (already prepared)")
        total = stats[0].merge(stats[1])
        dt = time.time() - t0
        report.append({"source": src.display_name(), "what": what, "folder": str(folder), "docs": total.docs,
                       "tokens": total.tokens, "skipped": total.skipped, "seconds": round(dt, 2),
                       "tokens_per_s": round(total.tokens / dt) if dt > 0 else 0})
    return report


def format_report(report: list[dict]) -> str:
    lines = []
    for r in report:
        skipped = ", ".join(f"{k} {v:,}" for k, v in sorted(r["skipped"].items())) or "none"
        lines.append(f"{r['source']} [{r['what']}]: {r['docs']:,} docs, {r['tokens']:,} tokens, skipped: {skipped}; "
                     f"{r['seconds']:.1f} s, {r['tokens_per_s']:,} tokens/s -> {r['folder']}")
    tokens, secs = sum(r["tokens"] for r in report), sum(r["seconds"] for r in report)
    lines.append(f"total: {tokens:,} tokens in {secs:.1f} s ({tokens / max(secs, 1e-9):,.0f} tokens/s)")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[list[str], int, tuple[int, int]]:
    """Split `num_proc=N` and `shard=i/n` off the Hydra overrides."""
    overrides, num_proc, shard = [], os.cpu_count() or 1, (0, 1)
    for a in argv:
        if a.startswith("num_proc="):
            num_proc = int(a.split("=", 1)[1])
            if num_proc < 1:
                raise ValueError(f"num_proc={num_proc} must be >= 1")
        elif a.startswith("shard="):
            m = re.fullmatch(r"(\d+)/(\d+)", a.split("=", 1)[1])
            if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
                raise ValueError(f"{a!r}: write shard=i/n with 0 <= i < n, e.g. shard=0/4")
            shard = (int(m.group(1)), int(m.group(2)))
        else:
            overrides.append(a)
    return overrides, num_proc, shard


def main(argv: list[str] | None = None) -> list[dict]:
    """Prepare what the overrides describe and print the report (errors propagate: see `cli`)."""
    overrides, num_proc, shard = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = compose(overrides)
    cfg.data.validate()
    report = prepare_all(cfg.data, resolve_tokenizer(cfg), num_proc, shard)
    print(format_report(report), flush=True)
    return report


PROG = "ar2diff.data.prepare"
USAGE = f"""usage: python -m {PROG} [recipe=NAME] [data.KEY=VALUE ...] [num_proc=N] [shard=i/n]

Tokenize the text sources of a config into data.cache_dir (and index its token-file sources) before training, so
ranks never wait on one rank tokenizing. Give the same recipe and data overrides as the training command.

  num_proc=N   tokenizing processes (default: every CPU core)
  shard=i/n    prepare only the i-th of n contiguous parts of each source, e.g. one per node (default 0/1)

The trainer reads the prepared files without tokenizing again (docs/data.md)."""
# What a user can cause (a config value, a file, a full disk), reported in one line; anything else is a bug.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, DiskFull)


def cli(argv: list[str] | None = None) -> int:
    """The command line: usage for -h/--help (exit 0); a user error is one line on stderr (exit 1)."""
    from hydra.errors import HydraException

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    try:
        main(argv)
    except DiskFull as err:
        message = err.strerror or str(err)
    except USER_ERRORS as err:
        message = str(err)
    except (HydraException, OmegaConfBaseException) as err:
        message = hydra_error_line(err)
    else:
        return 0
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(cli())
