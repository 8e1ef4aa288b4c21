"""Content-keyed cache folders written atomically, so concurrent ranks never see half a cache."""
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from ar2diff.fs import DiskFull, free_bytes, is_disk_full, remove_stale_temporaries, temporary_name


def digest(obj: Any, n: int = 16) -> str:
    """Stable hex digest of a JSON-able object (dict keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def unit_hash(key: str) -> float:
    """Map a string to [0, 1) by its sha256; the basis of every deterministic split."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) / 2.0**64


def cache_root(cache_dir: str) -> Path:
    return Path(os.path.expanduser(cache_dir))


def tokenizer_fingerprint(tokenizer) -> str:
    """Digest of everything about a tokenizer that changes the ids or the chat rendering.

    The TiDAR [MASK] token that a phase adds (model/mask_token.py) is left out: it never occurs in data, so
    data prepared with the base tokenizer serves every phase, before and after the mask token exists.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        mask = getattr(tokenizer, "mask_token", None)
        spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t.get("content") != mask]
        vocab = json.dumps(spec, sort_keys=True)
    else:
        vocab = json.dumps({k: v for k, v in tokenizer.get_vocab().items()
                            if k != getattr(tokenizer, "mask_token", None)}, sort_keys=True)
    return digest([hashlib.sha256(vocab.encode()).hexdigest(), tokenizer.chat_template,
                   tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id])


def cache_disk_full(final: Path) -> DiskFull:
    """The one-line error for a cache folder whose writing ran out of space (the partial folder already removed)."""
    return DiskFull(errno.ENOSPC, f"disk full while writing {final} under data.cache_dir; the partial files were "
                    f"removed, leaving {free_bytes(final):,} bytes free. Free space there (or set data.cache_dir to "
                    "a larger disk) and re-run the same command")


def build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Return `final`, calling build(tmp_dir) and renaming it into place if it does not exist yet.

    Several ranks may race: each builds into its own temporary folder, the first rename wins and the
    others discard theirs. A folder only ever appears complete. Temporary folders beside it that a killed
    process left are removed first (fs.remove_stale_temporaries: only those of this host whose process is
    gone). A full disk (also inside `datasets`, which wraps it in a DatasetGenerationError) becomes one
    DiskFull line naming the folder.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final.parent)
    tmp = final.parent / temporary_name(f".{final.name}", unique=True)
    tmp.mkdir()
    full = False
    try:
        build(tmp)
        os.rename(tmp, final)
    except Exception as err:
        if isinstance(err, OSError) and final.is_dir():
            pass  # another rank renamed its copy first
        elif is_disk_full(err, final.parent):
            full = True
        else:
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if full:
        raise cache_disk_full(final)
    return final
