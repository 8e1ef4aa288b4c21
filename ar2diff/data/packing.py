"""Tokenize documents, and the reference packing of documents into fixed-length rows with boundaries kept.

Stored data is compact (data/compact.py computes these same rows at read time); `pack_documents` is the
plain statement of what a row is, kept as the reference the stored rows are tested against.

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

Oversized documents: a fast tokenizer needs about 215 bytes of memory per character of the text in one call
(docs/data.md), so one 50 MB line took 10 GB. A text document longer than MAX_PIECE_CHARS characters is cut into
pieces of at most that many (`text_pieces`), tokenized piece by piece and the ids concatenated: nothing is dropped,
and the text of one tokenizer call (several short documents, or one piece) never exceeds MAX_PIECE_CHARS. Documents
up to MAX_PIECE_CHARS are tokenized whole, exactly as before.
"""
from typing import Iterable, Iterator

import datasets
import numpy as np

from . import stats as S
from .sft import TemplateError, encode_chat

TOKENIZED_FEATURES = datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                        "loss_mask": datasets.List(datasets.Value("bool")),
                                        "reason": datasets.Value("string")})


# ---------------------------------------------------------------- tokenization
MAX_PIECE_CHARS = 1 << 20  # characters of text per tokenizer call (~215 MB peak at ~215 bytes per character)


def safe_cut(text: str, lo: int, hi: int) -> int:
    """Where to end the piece of `text` that starts at `lo` (lo < hi < len(text)): a position in (lo, hi].

    In order of preference: before the last space in the window that follows a non-space (the regex pre-tokenizers
    of byte-level BPEs, GPT-2's, Llama 3's, Qwen's and this repo's, and SentencePiece's Metaspace, all cut there,
    so the pieces' tokens are exactly the whole text's); after the last newline with a non-space on both sides
    (the byte-level regexes cut there too); else at `hi`, a cut only the tokens around it may notice.
    """
    end = hi + 1
    while (q := text.rfind(" ", lo + 1, end)) >= 0:  # cut before the space at q
        if not text[q - 1].isspace():
            return q
        end = q
    end = hi
    while (q := text.rfind("\n", lo + 1, end)) >= 0:  # cut after the newline at q (q + 1 <= hi < len(text))
        if not text[q - 1].isspace() and not text[q + 1].isspace():
            return q + 1
        end = q
    return hi


def text_pieces(text: str, max_chars: int = MAX_PIECE_CHARS) -> Iterator[str]:
    """`text` as consecutive pieces of at most `max_chars` characters that join back to it (`safe_cut` picks each
    end); a text of at most `max_chars` characters is its own single piece."""
    start = 0
    while len(text) - start > max_chars:
        cut = safe_cut(text, start, start + max_chars)
        yield text[start:cut]
        start = cut
    yield text[start:]


def tokenize_texts(texts: list[str], tokenizer, max_chars: int = MAX_PIECE_CHARS) -> list[np.ndarray]:
    """int32 ids of each text (no special tokens added; literal special-token text stays text). The texts go to the
    tokenizer in calls of at most `max_chars` characters: short texts several at a time, a text over `max_chars` as
    its `text_pieces`, whose ids are concatenated. Memory: the call's ~215 bytes per character, plus 4 bytes per
    token of the ids kept, whatever one text's size."""
    parts: list[list[np.ndarray]] = [[] for _ in texts]
    group: list[str] = []
    owners: list[int] = []
    chars = 0

    def flush() -> None:
        nonlocal chars
        if group:
            enc = tokenizer(group, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            for j, ids in zip(owners, enc):
                parts[j].append(np.asarray(ids, np.int32))
        group.clear()
        owners.clear()
        chars = 0

    for j, text in enumerate(texts):
        for piece in text_pieces(text, max_chars):
            if chars + len(piece) > max_chars:
                flush()
            group.append(piece)
            owners.append(j)
            chars += len(piece)
    flush()
    return [p[0] if len(p) == 1 else np.concatenate(p) if p else np.zeros(0, np.int32) for p in parts]


def tokenize_batch(batch: dict, tokenizer, chat: bool, max_doc_tokens: int | None,
                   max_chars: int = MAX_PIECE_CHARS) -> dict:
    """Batched `datasets.map` function: normalized records -> input_ids, loss_mask, reason.

    Text documents go to the tokenizer `max_chars` characters at a time (`tokenize_texts`) and come back as numpy
    arrays (int32 ids, bool mask), chat records as lists: the stored values are the same either way."""
    eos = tokenizer.eos_token_id
    reasons = list(batch["reason"])
    good = [i for i, r in enumerate(reasons) if not r]
    empty_ids, empty_mask = ([], []) if chat else (np.zeros(0, np.int32), np.zeros(0, bool))
    out_ids: list = [empty_ids for _ in reasons]
    out_mask: list = [empty_mask for _ in reasons]
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
        for i, ids in zip(good, tokenize_texts([batch["text"][i] for i in good], tokenizer, max_chars)):
            out_ids[i] = np.append(ids, np.int32(eos))
            out_mask[i] = np.ones(len(out_ids[i]), bool)
    for i in good:
        if reasons[i]:
            continue
        if max_doc_tokens is not None and len(out_ids[i]) > max_doc_tokens:
            reasons[i], out_ids[i], out_mask[i] = S.TOO_LONG, empty_ids, empty_mask
    return {"input_ids": out_ids, "loss_mask": out_mask, "reason": reasons}


def tokenize_records(ds: datasets.Dataset, tokenizer, chat: bool, max_doc_tokens: int | None,
                     fingerprint: str, desc: str, num_proc: int = 1) -> datasets.Dataset:
    """Tokenize normalized records with `num_proc` processes (contiguous parts, concatenated in order)."""
    return ds.map(tokenize_batch, batched=True, batch_size=256, remove_columns=ds.column_names,
                  features=TOKENIZED_FEATURES, new_fingerprint=fingerprint, desc=desc,
                  num_proc=num_proc if num_proc > 1 and len(ds) > 1 else None,
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
