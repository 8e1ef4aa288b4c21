"""Oversized documents (issue #24 item 10): one 50 MB single-line document tokenized at ~190 bytes of memory per input
byte (9.6 GB). A text over packing.MAX_PIECE_CHARS characters is now cut at a space or newline into pieces of at most
that many, tokenized piece by piece and the ids concatenated: nothing is dropped, the tokens equal the whole text's
(the byte-level BPE's pre-tokenizer already cuts where the pieces end), and memory no longer grows with the
document at 190 bytes per byte. Documents up to the limit tokenize exactly as before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ar2diff.data import DataConfig, get_tokenizer
from ar2diff.data.packing import MAX_PIECE_CHARS, text_pieces, tokenize_batch, tokenize_texts
from ar2diff.data.sources import read_stdlib_file, stdlib_files

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    cfg = DataConfig(seq_len=32, heldout_fraction=0.0, bpe_vocab_size=512, bpe_max_bytes=200_000,
                     cache_dir=str(tmp_path_factory.mktemp("cache"))).validate()
    return get_tokenizer(cfg)


def stdlib_texts(pattern: str = "json/*") -> list[str]:
    return [t for t in (read_stdlib_file(r)[0] for r in stdlib_files(pattern)) if t]


def one_line(chars: int) -> str:
    """A single-line document of `chars` characters: stdlib code with every whitespace run made one space."""
    base = " ".join(" ".join(t.split()) for t in stdlib_texts())
    return (base * (chars // len(base) + 1))[:chars]


def whole(tok, text: str) -> list[int]:
    return tok([text], add_special_tokens=False, split_special_tokens=True)["input_ids"][0]


@pytest.mark.parametrize("text", [
    "word " * 5000,  # spaces only
    "x" * 10_000,  # no whitespace at all: cut at the limit
    "\n".join(["token"] * 3000),  # newlines only
    "a\n\n  b\t\t c  " * 700,  # runs of whitespace
    "é€😀 " * 2000,  # characters of 2, 3 and 4 UTF-8 bytes
])
def test_pieces_are_at_most_the_limit_and_join_back_to_the_text(text):
    for limit in (7, 64, 1000):
        pieces = list(text_pieces(text, limit))
        assert "".join(pieces) == text
        assert all(0 < len(p) <= limit for p in pieces)
        assert len(pieces) <= 2 * len(text) // limit + 1  # never many tiny pieces
    assert list(text_pieces(text, len(text))) == [text]  # up to the limit: the text itself, untouched


@pytest.mark.parametrize("kind", ["one line", "code", "one word per line"])
def test_piecewise_tokens_equal_the_whole_documents_tokens(tok, kind):
    """The cuts fall where the byte-level pre-tokenizer cuts anyway (before a space after a word; after a newline
    between two words), so no BPE merge spans them: the same ids as tokenizing the whole text."""
    text = {"one line": one_line(200_000), "code": "".join(stdlib_texts("email/*") + stdlib_texts())[:200_000],
            "one word per line": "\n".join(one_line(100_000).split())}[kind]
    (piecewise,) = tokenize_texts([text], tok, max_chars=2048)
    assert len(list(text_pieces(text, 2048))) >= len(text) // 2048 > 40
    assert piecewise.dtype == np.int32 and piecewise.tolist() == whole(tok, text)


def test_a_text_without_whitespace_loses_nothing_at_a_hard_cut(tok):
    """No space or newline to cut at: the cut falls at the limit. Only the tokens around it may differ from the whole
    text's; decoding gives back every character."""
    text = one_line(20_000).replace(" ", "_")
    (piecewise,) = tokenize_texts([text], tok, max_chars=1000)
    assert tok.decode(piecewise.tolist()) == text


def test_documents_up_to_the_limit_tokenize_as_before(tok):
    """Several short documents per tokenizer call (grouped up to the limit) give each document's own ids, then EOS;
    the stored values are those of the whole-document tokenization of before."""
    texts = stdlib_texts("json/*") + ["literal <|endoftext|> text", "x"]
    batch = {"text": texts + [""], "key": [str(i) for i in range(len(texts) + 1)],
             "reason": [""] * len(texts) + ["empty"]}
    for limit in (MAX_PIECE_CHARS, 3000):  # the default, and a limit that groups and splits these documents
        out = tokenize_batch(batch, tok, chat=False, max_doc_tokens=None, max_chars=limit)
        assert [ids.tolist() for ids in out["input_ids"][:-1]] == [whole(tok, t) + [tok.eos_token_id] for t in texts]
        assert all(m.all() and len(m) == len(i) for m, i in zip(out["loss_mask"], out["input_ids"]))
        assert len(out["input_ids"][-1]) == 0 and out["reason"][-1] == "empty"
    capped = tokenize_batch(batch, tok, chat=False, max_doc_tokens=5)
    assert capped["reason"][-2] == "" and capped["reason"][0] == "too_long" and len(capped["input_ids"][0]) == 0


MEASURE = """
import json, resource, sys
from transformers import PreTrainedTokenizerFast
from ar2diff.data.packing import tokenize_batch
tok = PreTrainedTokenizerFast.from_pretrained(sys.argv[1])
text = open(sys.argv[2]).read()
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = peak()
out = tokenize_batch({"text": [text], "key": ["k"], "reason": [""]}, tok, False, None)
pieces = peak() - base
ids = out["input_ids"][0].tolist()
del out
ref = tok([text], add_special_tokens=False, split_special_tokens=True)["input_ids"][0] + [tok.eos_token_id]
print(json.dumps({"pieces": pieces, "whole": peak() - base, "equal": ids == ref, "tokens": len(ids)}))
"""


@pytest.mark.e2e
def test_a_5mb_single_line_document_tokenizes_in_bounded_memory_to_the_same_tokens(tok, tmp_path):
    """Measured in a fresh process (peak resident memory): the map function on one 5 MB line stays within the
    stated bound (docs/data.md: about 300 bytes per character of one piece, plus 16 bytes per character of the
    document), where tokenizing the line whole takes ~200 bytes per byte; the ids are the same."""
    n = 5_000_000
    text = one_line(n)
    assert "\n" not in text and len(text.encode()) == n
    (tmp_path / "doc.txt").write_text(text)
    tok.save_pretrained(str(tmp_path / "tok"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "tok"), str(tmp_path / "doc.txt")],
                          capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["equal"] and got["tokens"] > n // 4
    bound = 300 * MAX_PIECE_CHARS + 16 * n
    assert got["pieces"] < bound < got["whole"], got
