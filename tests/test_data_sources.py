"""Sources: bad records skipped and counted, deterministic disjoint held-out split, file formats, hub, config."""
import json

import datasets
import pytest

from ar2diff.data import DataConfig, SourceConfig, get_tokenizer, load_packed, stdlib_corpus
from ar2diff.data import sources as sources_mod
from ar2diff.data.sources import in_heldout, read_records, read_stdlib_file, select_split, stdlib_files


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _cfg(cache, sources, **kw):
    base = dict(seq_len=32, heldout_fraction=0.0, bpe_vocab_size=512, bpe_max_bytes=200_000, cache_dir=cache)
    return DataConfig(sources=sources, **{**base, **kw}).validate()


def test_bad_text_records_are_skipped_and_counted(tmp_path, cache):
    lines = [b'{"text": "hello world"}', b'{"text": "second doc"}', b'{"text": "third", "extra": 1}',
             b'{"text": ""}', b'{"text": "  \\n "}',                         # empty x2
             b'{"text": "caf\xe9 latin-1"}', b'{"text": "\\ud800 lone surrogate"}',  # undecodable x2
             b'{"other": "x"}', b'{"text": null}',                            # missing_field x2
             b'{"text": 5}', b'{"text": ["a", "b"]}',                         # wrong_type x2
             b'{oops', b'[1, 2]',                                            # bad_json x2
             b'', b'   ',                                                   # blank lines: ignored
             json.dumps({"text": "word " * 200}).encode()]                    # too_long x1
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    cfg = _cfg(cache, [SourceConfig(kind="files", path=str(tmp_path / "bad.jsonl"))], max_doc_tokens=40)
    tok = get_tokenizer(cfg)
    data = load_packed(cfg, tok, "train")
    st = data.stats["bad.jsonl"]
    assert st.skipped == {"empty": 2, "undecodable": 2, "missing_field": 2, "wrong_type": 2, "bad_json": 2,
                          "too_long": 1}
    assert st.docs == 3
    real = data.rows(range(len(data)))["input_ids"][data.rows(range(len(data)))["doc_ids"] >= 0]
    assert tok.decode(real.tolist(), skip_special_tokens=True) == "hello worldsecond docthird"


def test_bad_chat_records_are_skipped_and_counted(tmp_path, cache):
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    recs = [{"messages": ok}, {"messages": "not a list"}, {"messages": []}, {"msgs": ok},
            {"messages": [{"role": "user", "content": "only a question"}]},
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
            {"messages": [{"role": "tool", "content": "t"}, {"role": "assistant", "content": "x"}]}]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    cfg = _cfg(cache, [SourceConfig(kind="files", path=str(tmp_path / "chat.jsonl"))], chat=True)
    tok = get_tokenizer(cfg)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
                         "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    st = load_packed(cfg, tok, "train").stats["chat.jsonl"]
    assert st.skipped == {"wrong_type": 3, "empty": 1, "missing_field": 1, "no_assistant": 1, "template_error": 1}
    assert st.docs == 1


def test_stdlib_split_is_by_file_deterministic_and_disjoint(cache):
    train = stdlib_corpus("train", 0.3, "email/*", cache)
    held = stdlib_corpus("heldout", 0.3, "email/*", cache)
    readable = {r for r in stdlib_files("email/*") if read_stdlib_file(r)[0] is not None}
    assert set(train["path"]).isdisjoint(held["path"])
    assert set(train["path"]) | set(held["path"]) == readable
    assert set(held["path"]) == {r for r in readable if in_heldout(r, 0.3)}
    assert 0 < len(held) < len(train)
    again = stdlib_corpus("heldout", 0.3, "email/*", cache)
    assert list(again["path"]) == list(held["path"]) and list(again["text"]) == list(held["text"])
    text_of = {p: t for p, t in zip(train["path"], train["text"])}
    assert text_of["email/utils.py"] == read_stdlib_file("email/utils.py")[0]


def test_document_split_is_by_content_hash(tmp_path, cache):
    docs = [f"document number {i} " * 3 for i in range(200)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    src = SourceConfig(kind="files", path=str(tmp_path / "d.jsonl"))
    cfg = _cfg(cache, [src], heldout_fraction=0.25)
    recs = read_records(src, cfg)
    train, held = (list(select_split(recs, 0.25, s)["text"]) for s in ("train", "heldout"))
    assert set(train).isdisjoint(held) and sorted(train + held) == sorted(docs)
    assert 25 <= len(held) <= 75
    (tmp_path / "shuffled.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in reversed(docs)))
    recs2 = read_records(SourceConfig(kind="files", path=str(tmp_path / "shuffled.jsonl")), cfg)
    assert set(select_split(recs2, 0.25, "heldout")["text"]) == set(held)  # order-independent
    tok = get_tokenizer(cfg)
    st_train, st_held = (load_packed(cfg, tok, s).stats["d.jsonl"] for s in ("train", "heldout"))
    assert (st_train.docs, st_held.docs) == (len(train), len(held))


def test_parquet_and_text_formats(tmp_path, cache):
    datasets.Dataset.from_dict({"body": ["alpha beta", None, "", "gamma"]}).to_parquet(str(tmp_path / "a.parquet"))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "one.txt").write_text("para one\n\npara two\n\n\nline a\nline b")
    (tmp_path / "t" / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    pq = SourceConfig(kind="files", path=str(tmp_path / "*.parquet"), text_field="body")
    assert list(read_records(pq, _cfg(cache, [pq]))["reason"]) == ["", "missing_field", "empty", ""]
    counts = {}
    for by in ("document", "paragraph", "line"):
        src = SourceConfig(kind="files", path=str(tmp_path / "t"), sample_by=by)
        reasons = list(read_records(src, _cfg(cache, [src]))["reason"])
        counts[by] = (reasons.count(""), reasons.count("undecodable"))
    assert counts == {"document": (1, 1), "paragraph": (3, 1), "line": (4, 1)}
    with pytest.raises(ValueError, match="text_field"):
        read_records(SourceConfig(kind="files", path=str(tmp_path / "a.parquet")), _cfg(cache, [pq]))


def test_hub_source_calls_load_dataset(monkeypatch, cache):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_dict({"content": ["from the hub", "second", None], "id": [1, 2, 3]})

    monkeypatch.setattr(sources_mod.datasets, "load_dataset", fake_load_dataset)
    src = SourceConfig(kind="hub", path="org/corpus", split="train[:3]", text_field="content")
    recs = read_records(src, _cfg(cache, [src]))
    assert calls == [("org/corpus", "train[:3]")]
    assert list(recs["text"])[:2] == ["from the hub", "second"] and list(recs["reason"]) == ["", "", "missing_field"]


@pytest.mark.parametrize("change, key", [
    ({"seq_len": 1}, "data.seq_len"), ({"seed": -1}, "data.seed"), ({"heldout_fraction": 1.0}, "data.heldout_fraction"),
    ({"sources": []}, "data.sources"), ({"max_doc_tokens": 0}, "data.max_doc_tokens"),
    ({"bpe_vocab_size": 100}, "data.bpe_vocab_size"),
    ({"sources": [SourceConfig(kind="s3")]}, "data.sources[0].kind"),
    ({"sources": [SourceConfig(), SourceConfig(kind="files", path="x", format="csv")]}, "data.sources[1].format"),
    ({"sources": [SourceConfig(kind="files")]}, "data.sources[0].path"),
    ({"sources": [SourceConfig(weight=0.0)]}, "data.sources[0].weight"),
    ({"sources": [SourceConfig(), SourceConfig(path="json/*")]}, "data.sources"),
    ({"chat": True}, "data.sources[0].kind"),
])
def test_config_validation_names_the_key(change, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        DataConfig(**change).validate()


def test_missing_files_name_the_key(cache):
    cfg = _cfg(cache, [SourceConfig(kind="files", path="/nonexistent/*.jsonl")])
    with pytest.raises(ValueError, match=r"data\.sources\[0\]\.path"):
        load_packed(cfg, get_tokenizer(cfg), "train")


def test_stdlib_chat_records_are_functions_with_their_docstrings(tmp_path):
    """The quickstart's SFT source: one conversation per documented stdlib function, split by file."""
    from ar2diff.config.data import DataConfig, SourceConfig
    from ar2diff.data.sources import read_records

    src = SourceConfig(kind="stdlib_chat", path="json/*")
    cfg = DataConfig(sources=[src], chat=True, cache_dir=str(tmp_path)).validate()
    ds = read_records(src, cfg)
    good = [r for r in ds if r["reason"] == ""]
    assert good and all(r["key"].startswith("json/") for r in good)
    dumps = [r for r in good if "json.dumps(" in r["messages"][0]["content"]]
    assert len(dumps) == 1
    user, assistant = dumps[0]["messages"]
    assert user["role"] == "user" and assistant["role"] == "assistant"
    assert assistant["content"].startswith("def dumps(") and "Serialize ``obj``" in user["content"]
    with pytest.raises(ValueError, match="kind=stdlib_chat yields chat records"):
        DataConfig(sources=[src], chat=False).validate()


def test_stdlib_docs_is_the_library_reference_prose_and_stdlib_leaves_it_out(cache):
    from pydoc_data.topics import topics

    assert not any(r.startswith("pydoc_data/") for r in stdlib_files())  # the code corpus never trains on it
    cfg = _cfg(cache, [SourceConfig(kind="stdlib_docs", path="a*")])
    ds = read_records(cfg.sources[0], cfg)
    names = sorted(t for t in topics if t.startswith("a"))
    assert ds["key"] == [f"pydoc_data/topics.py:{t}" for t in names] and ds["text"] == [topics[t] for t in names]
    with pytest.raises(ValueError, match="matches no topic"):
        read_records(SourceConfig(kind="stdlib_docs", path="no-such-topic*"), cfg)
    with pytest.raises(ValueError, match="kind=stdlib_docs has no chat messages"):
        DataConfig(sources=[SourceConfig(kind="stdlib_docs")], chat=True).validate()
