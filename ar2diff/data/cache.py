"""Content-keyed cache folders written atomically, so concurrent ranks never see half a cache."""
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable


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


def build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Return `final`, calling build(tmp_dir) and renaming it into place if it does not exist yet.

    Several ranks may race: each builds into its own temporary folder, the first rename wins and the
    others discard theirs. A folder only ever appears complete.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        build(tmp)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
