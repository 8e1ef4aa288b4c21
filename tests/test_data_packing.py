"""Packing keeps document boundaries: exact rows on a toy stream, and on stdlib files through the pipeline."""
import numpy as np
import pytest

from ar2diff.data import DataConfig, SourceConfig, get_tokenizer, load_packed, pack_documents
from ar2diff.data.cache import build_once
from ar2diff.data.sources import read_stdlib_file, stdlib_files

PAD = 99


def _pack(docs, seq_len, chunk_tokens=1 << 22):
    blocks = list(pack_documents([(d, [True] * len(d)) for d in docs], seq_len, PAD, chunk_tokens))
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def test_pack_exact_rows():
    rows = _pack([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]], seq_len=4)
    assert rows["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, PAD, PAD]]
    # doc 1 is cut at the first row's end and continues as doc id 0 (positions from 0) in row 2
    assert rows["doc_ids"].tolist() == [[0, 0, 0, 1], [0, 1, 1, 1], [0, 0, -1, -1]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 0], [0, 0, 1, 2], [0, 1, 0, 0]]
    assert rows["loss_mask"].tolist() == [[True] * 4, [True] * 4, [True, True, False, False]]
    assert rows["input_ids"].dtype == np.int32 and rows["doc_ids"].dtype == np.int32


def test_pack_chunking_and_empty_docs_do_not_change_rows():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(0, 50, size=n)) for n in rng.integers(0, 40, size=60)]  # includes empty docs
    one = _pack(docs, seq_len=16)
    chunked = _pack(docs, seq_len=16, chunk_tokens=7)
    for k in one:
        np.testing.assert_array_equal(one[k], chunked[k])
    total = sum(len(d) for d in docs)
    assert len(one["input_ids"]) == -(-total // 16)
    assert (one["doc_ids"][:-1] >= 0).all(), "only the last row may hold padding"
    _assert_segments_are_docs(one, [d for d in docs if d], 16)


def _assert_segments_are_docs(rows, docs, seq_len):
    """Flattened real tokens == concatenated docs; segments start exactly at doc starts or row starts,
    doc ids count segments 0,1,2.. per row and position ids count 0.. within each segment."""
    real = rows["doc_ids"].reshape(-1) >= 0
    flat_ids = rows["input_ids"].reshape(-1)[real]
    np.testing.assert_array_equal(flat_ids, np.concatenate([np.asarray(d) for d in docs]))
    doc_starts = set(np.cumsum([0] + [len(d) for d in docs[:-1]]).tolist())
    expected_starts = doc_starts | set(range(0, len(flat_ids), seq_len))
    doc_RS, pos_RS = rows["doc_ids"], rows["position_ids"]
    starts = set()
    for r in range(len(doc_RS)):
        d, p = doc_RS[r][doc_RS[r] >= 0], pos_RS[r][doc_RS[r] >= 0]
        seg_start = np.r_[True, d[1:] != d[:-1]]
        assert d[0] == 0 and (np.diff(d) >= 0).all() and (np.diff(d) <= 1).all()
        np.testing.assert_array_equal(np.cumsum(seg_start) - 1, d)
        for s in np.nonzero(seg_start)[0]:
            starts.add(r * seq_len + int(s))
        seg_begin = np.maximum.accumulate(np.where(seg_start, np.arange(len(d)), 0))
        np.testing.assert_array_equal(p, np.arange(len(d)) - seg_begin)
    assert starts == expected_starts


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return DataConfig(sources=[SourceConfig(path="json/*")], seq_len=64, heldout_fraction=0.0, bpe_vocab_size=512,
                      bpe_max_bytes=200_000, cache_dir=str(tmp_path_factory.mktemp("cache"))).validate()


def test_stdlib_rows_hold_each_file_in_order(cfg):
    tok = get_tokenizer(cfg)
    data = load_packed(cfg, tok, "train")
    rows = {k: v.numpy() for k, v in data.rows(np.arange(len(data))).items()}
    texts = [t for t in (read_stdlib_file(r)[0] for r in stdlib_files("json/*")) if t]
    docs = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    assert data.stats["stdlib"].docs == len(texts) and data.stats["stdlib"].tokens == sum(map(len, docs))
    _assert_segments_are_docs(rows, docs, cfg.seq_len)
    assert rows["loss_mask"].sum() == sum(map(len, docs))
    assert tok.decode(rows["input_ids"][rows["doc_ids"] >= 0][: len(docs[0]) - 1]) == texts[0]


def test_unreadable_stdlib_files_are_counted(cfg):
    c = DataConfig(**{**cfg.__dict__, "sources": [SourceConfig(path="test/encoded_modules/*")]})
    stats = load_packed(c, get_tokenizer(cfg), "train").stats["stdlib"]
    assert stats.skipped == {"undecodable": 2} and stats.docs == 1  # latin-1 and koi8-r modules


def test_special_token_text_inside_a_document_is_not_a_separator(tmp_path, cfg):
    tok = get_tokenizer(cfg)
    (tmp_path / "d.txt").write_text("before <|eos|> after")
    c = DataConfig(**{**cfg.__dict__, "sources": [SourceConfig(kind="files", path=str(tmp_path / "d.txt"))]})
    rows = load_packed(c, tok, "train").rows([0])
    ids = rows["input_ids"][0][rows["doc_ids"][0] >= 0].tolist()
    assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:-1]) == "before <|eos|> after"


def test_build_once_tolerates_a_concurrent_winner(tmp_path):
    final = tmp_path / "key"

    def build(tmp):
        (tmp / "mine").write_text("x")
        final.mkdir()  # another rank renamed its complete folder into place first
        (final / "theirs").write_text("y")

    assert build_once(final, build) == final
    assert [p.name for p in final.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["key"]  # our temporary folder is gone
    assert build_once(final, lambda tmp: pytest.fail("rebuilt an existing folder")) == final


def test_compact_rows_equal_reference_packing_across_segments_and_gaps():
    """Rows computed at read time from stored tokens (split over two segments, one with gaps between its
    documents in the file, loss-mask spans) equal the reference packing of the same documents."""
    from ar2diff.data.compact import Segment, TokenRows, mask_spans
    from ar2diff.data.stats import DataStats

    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 50, size=n) for n in rng.integers(1, 30, size=40)]
    masks = [rng.random(len(d)) < 0.6 for d in docs]
    ref_blocks = list(pack_documents(zip(docs, masks), 16, PAD))
    ref = {k: np.concatenate([b[k] for b in ref_blocks]) for k in ref_blocks[0]}
    first, second = docs[:25], docs[25:]
    flat1 = np.concatenate(first).astype(np.uint16)
    cum1 = np.r_[0, np.cumsum([len(d) for d in first])]
    seg1 = Segment(flat1, cum1, None, mask_spans(np.concatenate(masks[:25]), 0))
    gap_file = np.concatenate([np.r_[np.full(3, 7), d] for d in second]).astype(np.uint32)  # 3 junk ids per gap
    cum2 = np.r_[0, np.cumsum([len(d) for d in second])]
    starts2 = np.cumsum([3 + (len(second[i - 1]) if i else 0) for i in range(len(second))])
    seg2 = Segment(gap_file, cum2, starts2, mask_spans(np.concatenate(masks[25:]), 0))
    rows = TokenRows([seg1, seg2], 16, PAD, DataStats())
    got = rows.rows(np.arange(len(rows)))
    assert len(rows) == len(ref["input_ids"])
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
