"""Loader: exact resume, rank sharding, epoch reshuffle, mixture proportions, processed-data cache."""
import copy
import json

import numpy as np
import pytest
import torch

from ar2diff.data import DataConfig, SourceConfig, build_dataloaders, get_tokenizer, heldout_rows, mixture_order
from ar2diff.data import packing as packing_mod


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    cfg = DataConfig(sources=[SourceConfig(path="json/*")], seq_len=32, heldout_fraction=0.3, seed=3,
                     bpe_vocab_size=512, bpe_max_bytes=200_000, cache_dir=str(cache)).validate()
    return cfg, get_tokenizer(cfg)


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_exact_across_epochs(setup):
    cfg, tok = setup
    it = build_dataloaders(cfg, tok, batch_size=48).train
    assert it.steps_per_epoch < 12, "the run below must cross epoch boundaries"
    ref, states = [], []
    for _ in range(25):
        states.append(it.state_dict())
        ref.append(next(it))
    for cut in (0, 5, it.steps_per_epoch, 24):
        resumed = build_dataloaders(cfg, tok, batch_size=48).train
        resumed.load_state_dict(json.loads(json.dumps(states[cut])))  # survives a JSON round trip
        assert all(_same(next(resumed), ref[i]) for i in range(cut, 25))
    assert not _same(ref[0], ref[it.steps_per_epoch])


def test_epochs_reshuffle_and_cover_rows(setup):
    cfg, tok = setup
    it = build_dataloaders(cfg, tok, batch_size=1).train
    n = len(it.data)
    firsts = [torch.cat([next(it)["input_ids"] for _ in range(n)]) for _ in range(2)]
    all_rows = it.data.rows(np.arange(n))["input_ids"]
    for epoch in firsts:  # batch_size 1: every row exactly once per epoch
        assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, all_rows.tolist()))
    assert not torch.equal(firsts[0], firsts[1])


def test_ranks_take_disjoint_chunks_of_the_global_batch(setup):
    cfg, tok = setup
    single = build_dataloaders(cfg, tok, batch_size=6).train
    ranks = [build_dataloaders(cfg, tok, batch_size=2, rank=r, world_size=3).train for r in range(3)]
    for _ in range(2 * single.steps_per_epoch + 1):
        whole = next(single)
        parts = [next(r) for r in ranks]
        for k in whole:
            assert torch.equal(torch.cat([p[k] for p in parts]), whole[k])
    # the global batch is unchanged, so a 3-rank state resumes a 1-rank run at the same place
    resumed = build_dataloaders(cfg, tok, batch_size=6).train
    resumed.load_state_dict(ranks[0].state_dict())
    assert torch.equal(torch.cat([next(r)["input_ids"] for r in ranks]), next(resumed)["input_ids"])
    with pytest.raises(ValueError, match="global_batch"):
        build_dataloaders(cfg, tok, batch_size=4).train.load_state_dict(ranks[0].state_dict())
    with pytest.raises(ValueError, match="batch_size"):
        build_dataloaders(cfg, tok, batch_size=10_000)


def test_mixture_order_quotas_and_upsampling():
    sizes, weights = [100, 7, 40], [2.0, 1.0, 1.0]
    for epoch in range(3):
        order = mixture_order(sizes, weights, seed=0, epoch=epoch)
        src = np.searchsorted(np.cumsum(sizes), order, side="right")
        assert np.bincount(src).tolist() == [73, 37, 37]  # 147 draws, quotas 73.5/36.75/36.75: largest remainder
        small = order[src == 1] - 100
        assert np.bincount(small, minlength=7).max() - np.bincount(small, minlength=7).min() <= 1
        assert set(order[src == 0].tolist()) <= set(range(100))
    assert not np.array_equal(mixture_order(sizes, weights, 0, 0), mixture_order(sizes, weights, 0, 1))
    np.testing.assert_array_equal(mixture_order(sizes, weights, 0, 1), mixture_order(sizes, weights, 0, 1))


def test_mixture_batches_follow_weights(setup, tmp_path):
    cfg, tok = setup
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": "aaaa " * 30}) for _ in range(40)))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": "zzzz " * 30}) for _ in range(10)))
    a_only = set(tok("aaaa " * 30)["input_ids"]) - set(tok("zzzz " * 30)["input_ids"])
    mix = DataConfig(**{**cfg.__dict__, "heldout_fraction": 0.0, "sources": [
        SourceConfig(kind="files", path=str(tmp_path / "a.jsonl"), weight=1.0),
        SourceConfig(kind="files", path=str(tmp_path / "b.jsonl"), weight=3.0)]})
    it = build_dataloaders(mix, tok, batch_size=4).train
    assert it.data.sizes[0] > 3 * it.data.sizes[1]  # b is the smaller source, upsampled
    rows = torch.cat([next(it)["input_ids"] for _ in range(3 * it.steps_per_epoch)])
    share_a = np.mean([bool(a_only & set(r)) for r in rows.tolist()])
    assert abs(share_a - 0.25) < 0.05


def test_prepared_data_is_cached_and_serves_every_seq_len(setup, monkeypatch):
    cfg, tok = setup
    first = build_dataloaders(cfg, tok, batch_size=2)

    def boom(*a, **k):
        raise AssertionError("re-tokenized although the prepared tokens are cached")

    monkeypatch.setattr(packing_mod, "tokenize_records", boom)
    second = build_dataloaders(cfg, tok, batch_size=2)
    assert _same(next(first.train), next(second.train))
    # another seq_len (context extension) cuts other rows from the same stored tokens: nothing is re-tokenized
    longer = build_dataloaders(DataConfig(**{**cfg.__dict__, "seq_len": 48}), tok, batch_size=2)
    assert next(longer.train)["input_ids"].shape == (2, 48)
    assert longer.train.data.stats["stdlib"].tokens == first.train.data.stats["stdlib"].tokens
    # the [MASK] token a TiDAR phase adds does not change the data key either
    masked = copy.deepcopy(tok)
    masked.add_special_tokens({"mask_token": "<|mask|>"})
    assert _same(next(build_dataloaders(cfg, masked, batch_size=2).train), next(build_dataloaders(
        cfg, tok, batch_size=2).train))


def test_heldout_rows(setup):
    cfg, tok = setup
    loaders = build_dataloaders(cfg, tok, batch_size=2)
    rows = heldout_rows(cfg, tok)
    assert rows["input_ids"].shape == (len(loaders.heldout), cfg.seq_len) and len(loaders.heldout) > 0
    assert rows["input_ids"].dtype == torch.int64 and rows["doc_ids"].dtype == torch.int32
    assert rows["position_ids"].dtype == torch.int64 and rows["loss_mask"].dtype == torch.bool
    assert torch.equal(heldout_rows(cfg, tok, max_rows=3)["input_ids"], rows["input_ids"][:3])
    train_rows = loaders.train.data.rows(range(len(loaders.train.data)))["input_ids"]
    held = set(map(tuple, rows["input_ids"].tolist()))
    assert held.isdisjoint(map(tuple, train_rows.tolist()))
    assert loaders.heldout.stats["stdlib"].docs >= 1 and loaders.train.data.stats["stdlib"].docs >= 1
