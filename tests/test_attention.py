"""The one TiDAR predicate: its rules by hand, dense vs flex BlockMask, flex forward vs SDPA forward."""

import pytest
import torch

from ar2diff.model import TidarLM, block_mask, build_tidar_layout, dense_mask
from tiny import MASK_ID, tiny_model


def reference_mask(S: int, B: int, doc_ids: list[int]) -> torch.Tensor:
    """docs/design.md's rules written out with loops, independent of TokenMeta."""
    pos, start = [], {}
    for i, d in enumerate(doc_ids):
        start.setdefault(d, i)
        pos.append(i - start[d])
    allowed = torch.zeros(2 * S, 2 * S, dtype=torch.bool)
    for q in range(2 * S):
        for k in range(2 * S):
            qi, ki = q % S, k % S
            if doc_ids[qi] != doc_ids[ki]:
                continue
            if q < S and k < S:
                allowed[q, k] = pos[ki] <= pos[qi]
            elif q >= S and k < S:
                allowed[q, k] = pos[ki] < pos[qi] - pos[qi] % B
            elif q >= S and k >= S:
                allowed[q, k] = pos[ki] // B == pos[qi] // B
    return allowed


@pytest.mark.parametrize("block_size,docs", [(4, [0] * 10), (3, [0] * 5 + [1] * 6), (64, [0] * 70), (5, [0] * 7)])
def test_dense_mask_follows_the_design_rules(block_size, docs):
    S = len(docs)
    layout = build_tidar_layout(torch.zeros(1, S, dtype=torch.long), MASK_ID, block_size,
                                doc_ids_BS=torch.tensor([docs]))
    assert torch.equal(dense_mask(layout.meta)[0, 0], reference_mask(S, block_size, docs))


@pytest.mark.parametrize("block_size,S", [(4, 37), (16, 200), (7, 130)])
def test_flex_block_mask_is_the_same_predicate(block_size, S):
    doc_ids = torch.tensor([[0] * (S // 3) + [1] * (S - S // 3), [0] * S])
    layout = build_tidar_layout(torch.zeros(2, S, dtype=torch.long), MASK_ID, block_size, doc_ids_BS=doc_ids)
    dense = dense_mask(layout.meta)
    bm = block_mask(layout.meta, block_size=32)
    L = 2 * S
    q = torch.arange(L)[:, None].expand(L, L)
    k = torch.arange(L)[None, :].expand(L, L)
    for b in range(2):
        from_flex = bm.mask_mod(torch.tensor(b), torch.tensor(0), q, k)
        assert torch.equal(from_flex, dense[b, 0])
        # the block-sparsity structure never drops an allowed pair: a (q-block, k-block) tile with any allowed pair
        # is listed as partial or full
        tiles = bm.to_dense()[b, 0].bool()
        nq, nk = tiles.shape
        for i in range(nq):
            for j in range(nk):
                tile = dense[b, 0, i * 32:(i + 1) * 32, j * 32:(j + 1) * 32]
                assert bool(tile.any()) <= bool(tiles[i, j])


@pytest.mark.slow
def test_flex_forward_equals_sdpa_forward_on_cpu():
    sdpa = tiny_model("qwen3", seed=2)
    flex = tiny_model("qwen3", seed=2, attn="flex_attention")
    ids = torch.randint(3, MASK_ID, (2, 21), generator=torch.Generator().manual_seed(0))
    docs = torch.tensor([[0] * 8 + [1] * 13, [0] * 21])
    with torch.no_grad():
        a = TidarLM(sdpa, MASK_ID, 4)(ids, doc_ids=docs)
        b = TidarLM(flex, MASK_ID, 4)(ids, doc_ids=docs)
    torch.testing.assert_close(a.ar_logits, b.ar_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.diff_logits, b.diff_logits, rtol=1e-5, atol=1e-5)


def test_eager_gets_an_additive_mask_and_matches_sdpa():
    sdpa = tiny_model("llama", seed=3)
    eager = tiny_model("llama", seed=3, attn="eager")
    ids = torch.randint(3, MASK_ID, (1, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = TidarLM(sdpa, MASK_ID, 4)(ids)
        b = TidarLM(eager, MASK_ID, 4)(ids)
    torch.testing.assert_close(a.diff_logits, b.diff_logits, rtol=1e-5, atol=1e-5)


IDS = torch.randint(3, MASK_ID, (2, 21), generator=torch.Generator().manual_seed(0))
DOCS = torch.tensor([[0] * 8 + [1] * 13, [0] * 21])


def forward_backward(arch):
    """Logits of both streams and the parameter gradients of a simple loss on them, for a fresh tiny model."""
    model = TidarLM(tiny_model(arch, seed=4), MASK_ID, 4)
    out = model(IDS, doc_ids=DOCS)
    (out.ar_logits.square().mean() + out.diff_logits.square().mean()).backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def one_dense_call(monkeypatch):
    """Make the training forward pass its whole (2S)^2 mask to one SDPA call (no split plan)."""
    from ar2diff.model import attention

    monkeypatch.setattr("ar2diff.model.tidar.split_mask",
                        lambda meta, S, dtype: attention.attention_mask_for("sdpa", meta, dtype=dtype))


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "zaya"])
def test_sdpa_gets_one_additive_mask_bit_identical_to_the_boolean_form(arch, monkeypatch):
    """SDPA receives the additive float mask (built once per forward, not converted in every layer); outputs and
    gradients equal those of the boolean mask SDPA used to get, bit for bit."""
    from ar2diff.model import attention

    meta = build_tidar_layout(IDS, MASK_ID, 4, doc_ids_BS=DOCS).meta
    mask = attention.attention_mask_for("sdpa", meta)
    allowed = dense_mask(meta)
    assert mask.dtype == torch.float32 and mask.shape == allowed.shape == (2, 1, 42, 42)
    assert torch.equal(mask == 0, allowed) and bool((mask[~allowed] == torch.finfo(torch.float32).min).all())

    one_dense_call(monkeypatch)
    additive, additive_grads = forward_backward(arch)
    monkeypatch.setattr("ar2diff.model.tidar.split_mask", lambda meta, S, dtype: dense_mask(meta))
    boolean, boolean_grads = forward_backward(arch)
    assert torch.equal(additive.ar_logits, boolean.ar_logits)
    assert torch.equal(additive.diff_logits, boolean.diff_logits)
    assert additive_grads.keys() == boolean_grads.keys()
    assert all(torch.equal(additive_grads[n], boolean_grads[n]) for n in additive_grads)


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "mixtral", "olmoe", "zaya"])
def test_training_layout_sdpa_skips_masked_blocks_and_matches_one_dense_call(arch, monkeypatch):
    """The training forward hands its attention a split plan, and the registered "sdpa" then runs the clean
    queries over the clean keys and the draft queries in runs over only the keys they can see; outputs and
    gradients match the single dense call over (2S)^2."""
    import ar2diff.model.split_attention as split_attention

    seen = []
    real = split_attention.split_sdpa_forward

    def recording(module, query, key, value, attention_mask, **kwargs):
        plan = getattr(attention_mask, split_attention.PLAN_ATTRIBUTE, None)
        seen.append((None if plan is None else (plan.S, len(plan.runs)), query.shape[2]))
        return real(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(split_attention.AttentionInterface._global_mapping, "sdpa", recording)
    monkeypatch.setattr(split_attention, "MIN_RUN_ROWS", 4)  # 5 runs of draft queries at S = 21
    split, split_grads = forward_backward(arch)
    layers = tiny_model(arch).config.num_hidden_layers
    assert seen == [((21, 5), 42)] * layers  # every layer got the plan of the 2S layout
    seen.clear()
    one_dense_call(monkeypatch)
    dense, dense_grads = forward_backward(arch)
    assert seen == [(None, 42)] * layers
    torch.testing.assert_close(split.ar_logits, dense.ar_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.diff_logits, dense.diff_logits, rtol=1e-5, atol=1e-5)
    for name, grad in split_grads.items():
        torch.testing.assert_close(grad, dense_grads[name], rtol=1e-4, atol=1e-6)
    # the causal (AR) forward and decoding steps are never split
    seen.clear()
    TidarLM(tiny_model(arch, seed=4), MASK_ID, 4).causal_logits(IDS, DOCS)
    assert seen == [(None, 21)] * layers


PADDED_DOCS = torch.tensor([[0] * 8 + [1] * 13, [0] * 15 + [-1] * 6])


@pytest.mark.parametrize("docs", [DOCS, PADDED_DOCS], ids=["packed", "padded"])
@pytest.mark.parametrize("groups", [1, 3, 21])
def test_split_plan_drops_only_masked_columns_and_its_masks_are_the_dense_ones(groups, docs):
    """Each run of draft queries keeps every key column any of its queries can see; the columns it drops are masked
    for all of them, and its mask equals the dense mask on the columns kept (packed documents, padding, partial
    blocks and a random-ratio draft)."""
    from ar2diff.model.attention import attention_mask_for
    from ar2diff.model.split_attention import plan_split

    draft = torch.rand(2, 21, generator=torch.Generator().manual_seed(3)) < 0.6
    meta = build_tidar_layout(IDS, MASK_ID, 4, doc_ids_BS=docs, draft_mask_BS=draft).meta
    full = attention_mask_for("sdpa", meta)
    plan = plan_split(meta, 21, torch.float32, groups)
    assert torch.equal(plan.clean_mask, full[:, :, :21, :21]) and not bool((full[:, :, :21, 21:] == 0).any())
    assert [(r.start, r.stop) for r in plan.runs][0][0] == 0 and plan.runs[-1].stop == 21
    assert all(a.stop == b.start for a, b in zip(plan.runs, plan.runs[1:])) and len(plan.runs) == groups
    kept_pairs = 21 * 21
    for run in plan.runs:
        rows = full[:, :, 21 + run.start:21 + run.stop]
        cols = list(range(run.clean_stop)) + list(range(21 + run.draft_start, 21 + run.draft_stop))
        dropped = [c for c in range(42) if c not in cols]
        assert torch.equal(run.mask, rows[..., cols])
        assert not bool((rows[..., dropped] == 0).any())
        kept_pairs += run.mask.shape[-2] * run.mask.shape[-1]
    if groups == 21:  # one query a run: each keeps its own clean prefix and block, far below the 21 x 42 pairs
        assert kept_pairs < 21 * 21 + 21 * 42 * 0.7


def test_default_runs_of_draft_queries_grow_with_the_sequence_up_to_a_cap():
    from ar2diff.model.split_attention import MAX_DRAFT_GROUPS, draft_groups

    assert draft_groups(21) == 1 and draft_groups(256) == 4 and draft_groups(4096) == MAX_DRAFT_GROUPS == 8


def test_split_plan_refuses_what_is_not_the_training_layout():
    from ar2diff.model.layout import TokenMeta
    from ar2diff.model.split_attention import plan_split, split_mask, split_sdpa_forward

    meta = build_tidar_layout(IDS, MASK_ID, 4, doc_ids_BS=DOCS).meta
    with pytest.raises(ValueError, match="2S = 40"):
        plan_split(meta, 20, torch.float32)
    swapped = TokenMeta(*(torch.cat([getattr(meta, f)[:, 21:], getattr(meta, f)[:, :21]], 1)
                          for f in TokenMeta.fields()))
    with pytest.raises(ValueError, match="not the TiDAR training layout"):
        plan_split(swapped, 21, torch.float32)
    mask = split_mask(meta, 21, torch.float32)
    assert mask.shape == (2, 1, 42, 42) and mask.untyped_storage().nbytes() == 4  # a placeholder: one float
    q = torch.zeros(2, 2, 40, 8)
    with pytest.raises(ValueError, match="reached attention over 40 queries"):
        split_sdpa_forward(torch.nn.Module(), q, q, q, mask)


def test_masks_without_a_plan_go_to_transformers_sdpa_unchanged():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ar2diff.model.split_attention import split_sdpa_forward

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 10, 8, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 10, 10).masked_fill(torch.rand(2, 1, 10, 10, generator=g) < 0.3, -1e30)
    mask[..., 0] = 0  # every query sees a key
    module = torch.nn.Module()
    assert torch.equal(split_sdpa_forward(module, q, k, v, mask)[0], sdpa_attention_forward(module, q, k, v, mask)[0])
