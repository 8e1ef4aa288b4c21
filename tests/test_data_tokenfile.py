"""Pre-tokenized sources: flat token files and Megatron .bin/.idx pairs (written here from their documented
layouts) give exactly the rows of the same documents tokenized from text; the index pass refuses mismatches."""
import json
import struct

import numpy as np
import pytest
import torch

from ar2diff.data import DataConfig, SourceConfig, build_dataloaders, get_tokenizer, load_packed
from ar2diff.data import tokenfile as tokenfile_mod
from ar2diff.data.sources import read_stdlib_file, stdlib_files


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer, a jsonl of stdlib files, and the same documents as token ids (each ending with EOS)."""
    root = tmp_path_factory.mktemp("tok")
    cfg = DataConfig(sources=[SourceConfig(path="json/*")], seq_len=64, heldout_fraction=0.0, bpe_vocab_size=512,
                     bpe_max_bytes=200_000, cache_dir=str(root / "cache")).validate()
    tok = get_tokenizer(cfg)
    texts = [t for t in (read_stdlib_file(r)[0] for r in stdlib_files("json/*") + stdlib_files("email/_*")) if t]
    (root / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    docs = [tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [tok.eos_token_id]
            for t in texts]
    return cfg, tok, root, docs


def write_megatron(prefix, docs, dtype=np.uint16, code=8, split_first=True):
    """Megatron's MMapIndexedDataset layout: .bin = tokens back to back; .idx = header, int32 sequence lengths,
    int64 byte pointers, int64 document indices. The first document is written as two sequences."""
    seqs, doc_idx = [], [0]
    for i, d in enumerate(docs):
        parts = [d[:5], d[5:]] if i == 0 and split_first else [d]
        seqs += parts
        doc_idx.append(len(seqs))
    lengths = np.array([len(s) for s in seqs], np.int32)
    pointers = np.r_[0, np.cumsum(lengths)[:-1]].astype(np.int64) * np.dtype(dtype).itemsize
    np.concatenate([np.asarray(s, dtype) for s in seqs]).tofile(f"{prefix}.bin")
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code))
        f.write(struct.pack("<Q", len(seqs)) + struct.pack("<Q", len(doc_idx)))
        f.write(lengths.tobytes() + pointers.tobytes() + np.asarray(doc_idx, np.int64).tobytes())


def _cfg(cfg, *sources, **kw):
    return DataConfig(**{**cfg.__dict__, "sources": list(sources), **kw}).validate()


def _all_rows(cfg, tok, split="train"):
    data = load_packed(cfg, tok, split)
    return data, data.rows(np.arange(len(data)))


def test_token_files_and_megatron_give_the_rows_of_the_text(corpus):
    cfg, tok, root, docs = corpus
    flat = np.concatenate([np.asarray(d) for d in docs])
    np.save(root / "flat.npy", flat.astype(np.uint16))
    flat.astype(np.uint32).tofile(root / "flat.bin")
    np.save(root / "offsets.npy", np.r_[0, np.cumsum([len(d) for d in docs])].astype(np.int64))
    write_megatron(root / "mega", docs)
    eos = tok.eos_token_id
    text_data, ref = _all_rows(_cfg(cfg, SourceConfig(kind="files", path=str(root / "docs.jsonl"))), tok)
    assert text_data.stats["docs.jsonl"].docs == len(docs)
    for src in (SourceConfig(kind="tokens", path=str(root / "flat.npy"), eos_id=eos),
                SourceConfig(kind="tokens", path=str(root / "flat.bin"), dtype="uint32",
                             offsets_path=str(root / "offsets.npy")),
                SourceConfig(kind="megatron", path=str(root / "mega"), eos_id=eos)):
        data, rows = _all_rows(_cfg(cfg, src), tok)
        for k in ref:
            assert torch.equal(rows[k], ref[k]), (src.kind, k)
        st = data.stats[src.display_name()]
        assert (st.docs, st.tokens) == (len(docs), len(flat))
    # another seq_len from the same index: still the text's rows
    c128 = _cfg(cfg, SourceConfig(kind="megatron", path=str(root / "mega.idx"), eos_id=eos), seq_len=128)
    ref128 = _all_rows(_cfg(cfg, SourceConfig(kind="files", path=str(root / "docs.jsonl")), seq_len=128), tok)[1]
    assert all(torch.equal(_all_rows(c128, tok)[1][k], ref128[k]) for k in ref128)


def test_index_is_cached_and_start_up_reads_no_tokens(corpus, monkeypatch):
    cfg, tok, root, docs = corpus
    np.save(root / "cached.npy", np.concatenate([np.asarray(d) for d in docs]).astype(np.uint16))
    c = _cfg(cfg, SourceConfig(kind="tokens", path=str(root / "cached.npy"), eos_id=tok.eos_token_id))
    first = _all_rows(c, tok)[1]

    def boom(*a, **k):
        raise AssertionError("scanned the tokens again")

    monkeypatch.setattr(tokenfile_mod, "scan_tokens", boom)
    again = _all_rows(c, tok)[1]
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_heldout_of_token_files_is_deterministic_and_disjoint(corpus):
    cfg, tok, root, docs = corpus
    many = [list(d) for d in docs] * 4  # enough documents for both splits
    np.save(root / "many.npy", np.concatenate([np.asarray(d) for d in many]).astype(np.uint16))
    c = _cfg(cfg, SourceConfig(kind="tokens", path=str(root / "many.npy"), eos_id=tok.eos_token_id),
             heldout_fraction=0.3)
    train, held = load_packed(c, tok, "train"), load_packed(c, tok, "heldout")
    st_t, st_h = train.stats["many.npy"], held.stats["many.npy"]
    assert st_t.docs + st_h.docs == len(many) and st_h.docs > 0 and st_t.docs > 0
    assert st_t.tokens + st_h.tokens == sum(map(len, many))
    # the held-out documents are the ones whose index hashes below the fraction, the same on every run
    held_idx = np.flatnonzero(tokenfile_mod.unit_hash_array(np.arange(len(many))) < 0.3)
    expect = np.concatenate([np.asarray(many[i]) for i in held_idx])
    rows = held.rows(np.arange(len(held)))
    np.testing.assert_array_equal(rows["input_ids"][rows["doc_ids"] >= 0].numpy(), expect)
    it = build_dataloaders(c, tok, batch_size=2).train
    for _ in range(it.steps_per_epoch - 1):  # resume just before an epoch boundary: exact on this format too
        next(it)
    state = json.loads(json.dumps(it.state_dict()))
    ref = [next(it) for _ in range(it.steps_per_epoch + 2)]
    resumed = build_dataloaders(c, tok, batch_size=2).train
    resumed.load_state_dict(state)
    for b in ref:
        got = next(resumed)
        assert all(torch.equal(got[k], b[k]) for k in b)


def test_too_long_documents_are_skipped_and_counted(corpus):
    cfg, tok, root, docs = corpus
    write_megatron(root / "long", docs, split_first=False)
    limit = sorted(map(len, docs))[len(docs) // 2]
    c = _cfg(cfg, SourceConfig(kind="megatron", path=str(root / "long"), eos_id=tok.eos_token_id),
             max_doc_tokens=limit)
    st = load_packed(c, tok, "train").stats["long"]
    n_long = sum(len(d) > limit for d in docs)
    assert st.skipped == {"too_long": n_long} and st.docs == len(docs) - n_long


def test_mismatches_are_refused_by_name(corpus):
    cfg, tok, root, docs = corpus
    eos = tok.eos_token_id
    big = np.array([1, 2, len(tok) + 5, eos], np.uint32)
    np.save(root / "foreign.npy", big)
    with pytest.raises(ValueError, match=r"foreign\.npy holds token id %d, outside the tokenizer's vocabulary of %d"
                       % (len(tok) + 5, len(tok))):
        load_packed(_cfg(cfg, SourceConfig(kind="tokens", path=str(root / "foreign.npy"), eos_id=eos)), tok, "train")
    np.save(root / "noeos.npy", np.array([300, 301, 302, 303], np.uint16))
    with pytest.raises(ValueError, match=r"eos_id=%d: no token of .*noeos\.npy" % eos):
        load_packed(_cfg(cfg, SourceConfig(kind="tokens", path=str(root / "noeos.npy"), eos_id=eos)), tok, "train")
    with pytest.raises(ValueError, match=r"data.sources\[0\].eos_id=3 differs from the tokenizer's eos_token_id"):
        load_packed(_cfg(cfg, SourceConfig(kind="tokens", path=str(root / "noeos.npy"), eos_id=3)), tok, "train")
    (root / "raw.bin").write_bytes(b"\x00" * 6)
    with pytest.raises(ValueError, match=r"dtype is auto but .*raw\.bin is a raw token file"):
        load_packed(_cfg(cfg, SourceConfig(kind="tokens", path=str(root / "raw.bin"), eos_id=eos)), tok, "train")
    (root / "bad.idx").write_bytes(b"NOTMEGATRON" + b"\x00" * 40)
    (root / "bad.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"bad\.idx is not a Megatron indexed-dataset index"):
        load_packed(_cfg(cfg, SourceConfig(kind="megatron", path=str(root / "bad"), eos_id=eos)), tok, "train")
    with pytest.raises(ValueError, match=r"data.sources\[0\].eos_id is not set"):
        _cfg(cfg, SourceConfig(kind="tokens", path=str(root / "noeos.npy")))
