"""Read a source into a `datasets.Dataset` of normalized records and split it deterministically.

Every reader yields the same schema: the document ("text" string, or "messages" list of
{role, content}), a "key" (what the held-out split hashes: the stdlib file's relative path, otherwise
a digest of the document) and a "reason" ("" for a good record, else why it will be skipped; see
stats.REASONS). Bad records are never raised: they are kept with a reason so they can be counted.
jsonl and text files are read by our own line/file reader because `datasets`' json loader aborts the
whole file on one undecodable or malformed line.
"""
import fnmatch
import glob
import json
import os
import re
import sysconfig
from pathlib import Path
from pydoc_data.topics import topics as pydoc_topics
from typing import Any

import datasets

from ar2diff.config.data import DataConfig, SourceConfig
from ar2diff.data.stdlib_chat import chat_records

from . import stats as S
from .cache import cache_root, digest, unit_hash

TEXT_FEATURES = datasets.Features(
    {"text": datasets.Value("string"), "key": datasets.Value("string"), "reason": datasets.Value("string")})
CHAT_FEATURES = datasets.Features({
    "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
    "key": datasets.Value("string"), "reason": datasets.Value("string")})
_EXT_FORMAT = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
# pydoc_data holds the library reference's prose (kind=stdlib_docs), not code: the code corpus leaves it out, so the
# prose stays an out-of-domain set that no stdlib run trains on
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_DOCS_DIR = "pydoc_data"
STDLIB_DOCS = "pydoc_data/topics.py"


# ---------------------------------------------------------------- held-out split
def in_heldout(key: str, fraction: float) -> bool:
    """A record is held out iff the hash of its key falls below `fraction` (seed-independent)."""
    return unit_hash(key) < fraction


def select_split(ds: datasets.Dataset, fraction: float, split: str) -> datasets.Dataset:
    """Keep the records of `split` ("train" or "heldout") by the hash of their "key" column."""
    want = split == "heldout"
    return ds.filter(lambda keys: [in_heldout(k, fraction) == want for k in keys],
                     input_columns="key", batched=True, desc=f"split {split}")


# ---------------------------------------------------------------- record validation
def _clean_str(value: Any) -> tuple[str | None, str]:
    """(text, "") for a valid UTF-8 string, else (None, reason)."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, S.UNDECODABLE
    if not isinstance(value, str):
        return None, S.WRONG_TYPE
    try:
        value.encode("utf-8")  # lone surrogates from JSON escapes cannot be stored
    except UnicodeEncodeError:
        return None, S.UNDECODABLE
    return value, ""


def validate_record(rec: Any, src: SourceConfig, chat: bool) -> tuple[Any, str]:
    """(document, "") for a usable record, else (None, reason). Never raises."""
    if not isinstance(rec, dict):
        return None, S.BAD_JSON
    field = src.messages_field if chat else src.text_field
    value = rec.get(field)
    if value is None:
        return None, S.MISSING_FIELD
    if not chat:
        text, reason = _clean_str(value)
        if reason:
            return None, reason
        return (text, "") if text.strip() else (None, S.EMPTY)
    if not isinstance(value, (list, tuple)):
        return None, S.WRONG_TYPE
    if not value:
        return None, S.EMPTY
    messages = []
    for m in value:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return None, S.WRONG_TYPE
        role, r1 = _clean_str(m["role"])
        content, r2 = _clean_str(m["content"])
        if r1 or r2:
            return None, r1 or r2
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        return None, S.NO_ASSISTANT
    return messages, ""


def _record(doc: Any, reason: str, bad_key: str, chat: bool) -> dict:
    key = bad_key if reason else digest(doc, 32)
    if chat:
        return {"messages": doc or [], "key": key, "reason": reason}
    return {"text": doc or "", "key": key, "reason": reason}


# ---------------------------------------------------------------- stdlib corpus
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(pattern: str = "", with_docs: bool = False) -> list[str]:
    """Sorted relative paths of the interpreter's stdlib `.py` files (no site-packages), fnmatch-filtered.
    `pydoc_data` (the reference's prose, kind=stdlib_docs) only `with_docs`: the BPE's corpus keeps it, so the
    stdlib tokenizer (and every curve recorded with it) is the one it always was."""
    root = stdlib_root()
    skip = _SKIP_DIRS if with_docs else _SKIP_DIRS | {_DOCS_DIR}
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        rel_dir = os.path.relpath(dirpath, root)
        for f in filenames:
            if f.endswith(".py"):
                rel = f if rel_dir == "." else f"{rel_dir}/{f}".replace(os.sep, "/")
                if not pattern or fnmatch.fnmatch(rel, pattern):
                    rels.append(rel)
    return sorted(rels)


def read_stdlib_file(rel: str) -> tuple[str | None, str]:
    """(text, "") or (None, reason) for one stdlib file."""
    text, reason = _clean_str((stdlib_root() / rel).read_bytes())
    if reason:
        return None, reason
    return (text, "") if text.strip() else (None, S.EMPTY)


def _stdlib_gen(rels: list[str], fingerprint: str):
    for rel in rels:
        text, reason = read_stdlib_file(rel)
        yield {"text": text or "", "key": rel, "reason": reason}


def stdlib_corpus(split: str = "train", heldout_fraction: float = 0.02, pattern: str = "",
                  cache_dir: str = "~/.cache/ar2diff/data") -> datasets.Dataset:
    """The default corpus: readable stdlib files of one split as a Dataset of {"text", "path"}.

    Split by file: a file is held out iff the hash of its relative path is below heldout_fraction.
    """
    ds = _read_stdlib(pattern, cache_dir)
    ds = select_split(ds, heldout_fraction, split).filter(lambda r: r == "", input_columns="reason")
    return ds.remove_columns("reason").rename_column("key", "path")


def _stdlib_chat_gen(rels: list[str], fingerprint: str):
    for rel in rels:
        text, reason = read_stdlib_file(rel)
        if reason:
            yield {"messages": [], "key": rel, "reason": reason}
            continue
        for messages, reason in chat_records(rel, text):
            yield {"messages": messages or [], "key": rel, "reason": reason}


def stdlib_docs(pattern: str = "") -> dict[str, str]:
    """{topic: text} of the library reference's topics (`pydoc_data.topics`, English prose), fnmatch-filtered."""
    return {k: v for k, v in sorted(pydoc_topics.items()) if not pattern or fnmatch.fnmatch(k, pattern)}


def _stdlib_docs_gen(pattern: str, fingerprint: str):
    for topic, text in stdlib_docs(pattern).items():
        yield {"text": text, "key": f"{STDLIB_DOCS}:{topic}", "reason": "" if text.strip() else S.EMPTY}


def _read_stdlib_docs(pattern: str, cache_dir: str) -> datasets.Dataset:
    if not stdlib_docs(pattern):
        raise ValueError(f"stdlib_docs source path filter {pattern!r} matches no topic of {STDLIB_DOCS}")
    return datasets.Dataset.from_generator(
        _stdlib_docs_gen, features=TEXT_FEATURES, cache_dir=str(cache_root(cache_dir) / "hf"),
        gen_kwargs={"pattern": pattern, "fingerprint": files_fingerprint([stdlib_root() / STDLIB_DOCS])})


def _read_stdlib(pattern: str, cache_dir: str, chat: bool = False) -> datasets.Dataset:
    """The stdlib as text documents (one per file) or as chat records (stdlib_chat.py), keyed by file."""
    rels = stdlib_files(pattern)
    if not rels:
        raise ValueError(f"stdlib source path filter {pattern!r} matches no file under {stdlib_root()}")
    return datasets.Dataset.from_generator(
        _stdlib_chat_gen if chat else _stdlib_gen, features=CHAT_FEATURES if chat else TEXT_FEATURES,
        cache_dir=str(cache_root(cache_dir) / "hf"),
        gen_kwargs={"rels": rels, "fingerprint": files_fingerprint([stdlib_root() / r for r in rels])})


# ---------------------------------------------------------------- local files
def resolve_files(path: str, key: str = "data.sources[].path") -> list[Path]:
    """A file, every file under a directory, or a glob's matches; sorted. ValueError if none."""
    p = Path(os.path.expanduser(path))
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
    elif any(c in path for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(path), recursive=True) if os.path.isfile(f))
    else:
        files = [p] if p.is_file() else []
    if not files:
        raise ValueError(f"{key}={path!r} matches no file; give an existing file, folder or glob")
    return files


def files_fingerprint(files: list[Path]) -> str:
    """Digest of (path, size, mtime) of each file: changes when any file changes."""
    return digest([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files], 32)


def file_format(src: SourceConfig, files: list[Path]) -> str:
    if src.format != "auto":
        return src.format
    formats = {_EXT_FORMAT.get(f.suffix.lower(), "text") for f in files}
    if len(formats) > 1:
        raise ValueError(f"source {src.display_name()!r}: files of several formats {sorted(formats)} under "
                         f"{src.path!r}; split them into sources or set `format`")
    return formats.pop()


def _jsonl_gen(files: list[str], fingerprint: str, src: SourceConfig, chat: bool):
    for f in files:
        with open(f, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                bad_key = f"{f}:{lineno}"
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    yield _record(None, S.UNDECODABLE, bad_key, chat)
                    continue
                except ValueError:
                    yield _record(None, S.BAD_JSON, bad_key, chat)
                    continue
                doc, reason = validate_record(rec, src, chat)
                yield _record(doc, reason, bad_key, chat)


def _text_gen(files: list[str], fingerprint: str, sample_by: str):
    for f in files:
        text, reason = _clean_str(Path(f).read_bytes())
        if reason:
            yield _record(None, reason, f, False)
            continue
        pieces = {"document": [text], "paragraph": re.split(r"\n\s*\n", text), "line": text.splitlines()}
        for i, piece in enumerate(pieces[sample_by]):
            yield _record(piece, "" if piece.strip() else S.EMPTY, f"{f}:{i}", False)


def _normalize(ds: datasets.Dataset, src: SourceConfig, chat: bool, key: str) -> datasets.Dataset:
    """Map an arbitrary-schema dataset (parquet, hub) onto the normalized record schema."""
    field = src.messages_field if chat else src.text_field
    if field not in ds.column_names:
        which = "messages_field" if chat else "text_field"
        raise ValueError(f"source {src.display_name()!r}: no column {field!r} (columns: {ds.column_names}); "
                         f"set {key}.{which}")
    name = src.display_name()

    def fn(batch: dict, indices: list[int]) -> dict:
        cols = list(batch)
        recs = [_record(*validate_record({c: batch[c][j] for c in cols}, src, chat), f"{name}:{i}", chat)
                for j, i in enumerate(indices)]
        return {k: [r[k] for r in recs] for k in recs[0]} if recs else {}

    return ds.map(fn, with_indices=True, batched=True, remove_columns=ds.column_names,
                  features=CHAT_FEATURES if chat else TEXT_FEATURES, desc=f"validate {name}")


# ---------------------------------------------------------------- entry point
def source_fingerprint(src: SourceConfig, key: str = "data.sources[]") -> str:
    """Digest of the source's content where it can be had cheaply (files: stat; stdlib: stat + version)."""
    if src.kind in ("stdlib", "stdlib_chat"):
        return files_fingerprint([stdlib_root() / r for r in stdlib_files(src.path)])
    if src.kind == "stdlib_docs":
        return digest([files_fingerprint([stdlib_root() / STDLIB_DOCS]), src.path])
    if src.kind == "files":
        return files_fingerprint(resolve_files(src.path, f"{key}.path"))
    return digest([src.path, src.split])  # hub: name and split; the hub's own cache handles revisions


def read_records(src: SourceConfig, cfg: DataConfig, key: str = "data.sources[]",
                 files: list[Path] | None = None) -> datasets.Dataset:
    """All records of one source, normalized (see module docstring), first `max_docs` only if set.

    `files` (kind=files): read only these of the source's files (a shard of a prepared source).
    """
    hf_cache = str(cache_root(cfg.cache_dir) / "hf")
    features = CHAT_FEATURES if cfg.chat else TEXT_FEATURES
    if src.kind == "stdlib":
        ds = _read_stdlib(src.path, cfg.cache_dir)
    elif src.kind == "stdlib_chat":
        ds = _read_stdlib(src.path, cfg.cache_dir, chat=True)
    elif src.kind == "stdlib_docs":
        ds = _read_stdlib_docs(src.path, cfg.cache_dir)
    elif src.kind == "hub":
        ds = _normalize(datasets.load_dataset(src.path, split=src.split), src, cfg.chat, key)
    else:
        files = files if files is not None else resolve_files(src.path, f"{key}.path")
        fmt, names, fp = file_format(src, files), [str(f) for f in files], files_fingerprint(files)
        if fmt == "parquet":
            raw = datasets.load_dataset("parquet", data_files=names, split="train", cache_dir=hf_cache)
            ds = _normalize(raw, src, cfg.chat, key)
        elif fmt == "jsonl":
            ds = datasets.Dataset.from_generator(_jsonl_gen, features=features, cache_dir=hf_cache, gen_kwargs={
                "files": names, "fingerprint": fp, "src": src, "chat": cfg.chat})
        else:
            ds = datasets.Dataset.from_generator(_text_gen, features=features, cache_dir=hf_cache, gen_kwargs={
                "files": names, "fingerprint": fp, "sample_by": src.sample_by})
    if src.max_docs is not None and len(ds) > src.max_docs:
        ds = ds.select(range(src.max_docs))
    return ds
