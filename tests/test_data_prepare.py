"""`python -m ar2diff.data.prepare`: 2 processes and 2 shards give the rows of one process; bad records are
counted by reason; the trainer reads prepared shards without tokenizing and refuses large unprepared sources."""
import json

import numpy as np
import pytest
import torch

from ar2diff.data import DataConfig, SourceConfig, get_tokenizer, load_packed, prepare_data
from ar2diff.data.report import report_sources
from ar2diff.data import packing as packing_mod
from ar2diff.data.prepare import main, prepare_all, prepared_root
from ar2diff.data.sources import read_stdlib_file, stdlib_files

BAD_LINES = ['{"text": ', '{"other": "x"}', '{"text": "   "}', '{"text": 5}']


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    cfg = DataConfig(seq_len=48, heldout_fraction=0.2, bpe_vocab_size=512, bpe_max_bytes=200_000,
                     cache_dir=str(root / "tokcache")).validate()
    tok = get_tokenizer(cfg)
    texts = [t for t in (read_stdlib_file(r)[0] for r in stdlib_files("json/*") + stdlib_files("email/_*")) if t]
    texts = [p for t in texts for p in t.split("\n\n") if p.strip()][:300]
    folder = root / "jsonl"
    folder.mkdir()
    for i in range(3):
        lines = [json.dumps({"text": t}) for t in texts[i::3]] + BAD_LINES[i:i + 2]
        (folder / f"part{i}.jsonl").write_text("\n".join(lines) + "\n")
        (folder / f"part{i}.jsonl").open("ab").write(b'{"text": "\xff\xfe"}\n')
    return cfg, tok, root


def _cfg(cfg, root, cache, path):
    return DataConfig(**{**cfg.__dict__, "cache_dir": str(root / cache),
                         "sources": [SourceConfig(kind="files", path=str(path), name="corpus")]}).validate()


def _rows(cfg, tok):
    out = {}
    for split in ("train", "heldout"):
        data = load_packed(cfg, tok, split)
        out[split] = (data.rows(np.arange(len(data))), data.stats["corpus"])
    return out


def _assert_same(a, b):
    for split in a:
        assert all(torch.equal(a[split][0][k], b[split][0][k]) for k in a[split][0]), split
        assert a[split][1] == b[split][1], split


@pytest.mark.dist
def test_two_processes_and_two_shards_give_the_rows_of_one(setup, monkeypatch):
    cfg, tok, root = setup
    for path in (root / "jsonl", root / "jsonl" / "part0.jsonl"):  # 3 files: shards by file; 1 file: by record
        tag = path.name
        one = _cfg(cfg, root, f"one-{tag}", path)
        report = prepare_all(one, tok, num_proc=1)
        ref = _rows(one, tok)
        st = ref["train"][1].merge(ref["heldout"][1])
        assert report[0]["tokens"] == st.tokens > 0 and report[0]["skipped"] == st.skipped
        n_files = 3 if path.is_dir() else 1
        assert st.skipped["undecodable"] == n_files and st.skipped["bad_json"] >= 1
        assert sum(st.skipped.values()) == sum(len(BAD_LINES[i:i + 2]) + 1 for i in range(n_files))
        two_proc = _cfg(cfg, root, f"np2-{tag}", path)
        prepare_all(two_proc, tok, num_proc=2)
        sharded = _cfg(cfg, root, f"shards-{tag}", path)
        for i in (1, 0):
            prepare_all(sharded, tok, num_proc=1, shard=(i, 2))
        assert (prepared_root(sharded, sharded.sources[0], tok, "data.sources[0]") / "of-2").is_dir()
        with monkeypatch.context() as m:  # the trainer reads the prepared shards; it never tokenizes
            m.setattr(packing_mod, "tokenize_records", lambda *a, **k: pytest.fail("re-tokenized"))
            _assert_same(ref, _rows(two_proc, tok))
            _assert_same(ref, _rows(sharded, tok))


def test_cli_prepares_what_the_trainer_reads(setup, monkeypatch, capsys):
    cfg, tok, root = setup
    cache = root / "cli"
    tok.save_pretrained(str(root / "tokenizer"))
    overrides = ["data=files", f"data.sources.0.path={root / 'jsonl'}", "+data.sources.0.name=corpus",
                 f"data.tokenizer_path={root / 'tokenizer'}", "data.heldout_fraction=0.2", "data.seq_len=48"]
    for i in (0, 1):
        main(overrides + [f"data.cache_dir={cache}", "num_proc=1", f"shard={i}/2"])
    out = capsys.readouterr().out
    assert "corpus [shard 1/2]" in out and "tokens/s" in out and "skipped: bad_json" in out
    ref = _rows(_cfg(cfg, root, "one-jsonl", root / "jsonl"), tok)
    monkeypatch.setattr(packing_mod, "tokenize_records", lambda *a, **k: pytest.fail("re-tokenized"))
    _assert_same(ref, _rows(_cfg(cfg, root, "cli", root / "jsonl"), tok))
    with pytest.raises(ValueError, match=r"shard=i/n with 0 <= i < n"):
        main(overrides + ["shard=2/2"])


def test_large_unprepared_source_is_refused_before_ranks_wait(setup):
    cfg, tok, root = setup
    c = DataConfig(**{**_cfg(cfg, root, "refuse", root / "jsonl").__dict__, "max_inline_bytes": 1000})
    prepare_all(c, tok, shard=(0, 2))  # half prepared is not prepared
    with pytest.raises(ValueError, match=r"data.sources\[0\] \('corpus'\) is not prepared .*shards \[1\] of 2 are "
                                         r"missing.*python -m ar2diff.data.prepare"):
        prepare_data(c, tok)
    prepare_all(c, tok, shard=(1, 2))
    prepare_data(c, tok)


def test_source_report_gives_budget_shares_and_warns_on_repeats(setup):
    cfg, tok, root = setup
    c = DataConfig(**{**cfg.__dict__, "cache_dir": str(root / "one-jsonl"), "sources": [
        SourceConfig(kind="files", path=str(root / "jsonl" / "part0.jsonl"), name="small", weight=1.0),
        SourceConfig(kind="files", path=str(root / "jsonl"), name="corpus", weight=1.0)]}).validate()
    train, heldout = load_packed(c, tok, "train"), load_packed(c, tok, "heldout")
    lines: list[str] = []
    warnings = report_sources(train, heldout, budget_rows=10 * train.sizes[0], max_repeats=4.0,
                              print_fn=lines.append)
    small = next(line for line in lines if line.startswith("[data] small: "))
    assert "50.0% of the budget, 5.00 epochs" in small
    assert len(warnings) == 1 and warnings[0].startswith("data source small: the budget goes over its")
    assert "5.0 times (> data.max_repeats=4)" in warnings[0]


@pytest.mark.parametrize("texts, fraction", [(["def one():\n    return 1\n"], 0.2),  # one document: nothing held out
                                             (["a = 1\n", "b = 2\n", "c = 3\n"], 0.0)])
def test_an_empty_heldout_split_keeps_the_source_cache_that_later_prepares_read(setup, tmp_path, texts, fraction):
    """Issue #24 item 4: `datasets.map` on the empty held-out split returned the source's own arrow file and the
    clean-up deleted it; every later prepare of the source then failed with `Failed to open …
    generator-train.arrow`."""
    cfg, tok, _ = setup
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, text in enumerate(texts):
        (folder / f"doc{i}.txt").write_text(text)
    first = DataConfig(**{**cfg.__dict__, "cache_dir": str(tmp_path / "cache"), "heldout_fraction": fraction,
                          "sources": [SourceConfig(kind="files", path=str(folder), name="docs")]}).validate()
    assert prepare_all(first, tok)[0]["docs"] == len(texts)
    assert load_packed(first, tok, "heldout").stats["docs"].docs == 0
    source_arrow = sorted((tmp_path / "cache" / "hf").rglob("generator-*.arrow"))
    assert source_arrow and all(f.is_file() for f in source_arrow)
    for change in ({"max_doc_tokens": 10_000}, {"heldout_fraction": 0.5}):  # new keys: tokenized again
        again = DataConfig(**{**first.__dict__, **change}).validate()
        report = prepare_all(again, tok)
        assert report[0]["what"] == "shard 0/1" and report[0]["docs"] == len(texts)
    assert all(f.is_file() for f in source_arrow)
