"""TiDAR-aware Ulysses sequence parallelism (ar2diff.model.sequence_shard, ar2diff.model.zaya_halo,
ar2diff.trainer.sequence_parallel).

The distributed checks run the modes of tests/sp_worker.py in the session's one `torchrun --nproc_per_node 2` launch
(gloo, CPU; the `rank_jobs` fixture, tests/rank_jobs.py); that subprocess is also where DeepSpeed's
`register_with_transformers` may change transformers' global attention table (its mode runs last).
Batch: two packed rows of 16 tokens, block size 4, mask_ratio 0.5, a prompt without loss, padding, and a draft
block [7, 11) straddling the shard edge at 8; activation checkpointing on; fp32.
"""

import json

import pytest
import torch

from ar2diff.model.layout import build_tidar_layout
from ar2diff.model.sequence_shard import extended_prev, plan_shard
from ar2diff.trainer.sequence_parallel import check_heads, loss_scale

RANK_JOBS = {"sp": {"modes": "model,engine,flex,long,flex_long,stock"}}  # for the rank_jobs fixture (tests/conftest.py)


@pytest.fixture(scope="module")
def two_ranks(rank_jobs) -> dict:
    """The sp_worker modes' results, from the session's one 2-rank launch (stock ran last, as its own job)."""
    results = json.loads((rank_jobs / "sp" / "results.json").read_text())
    return {**results, "stock": json.loads((rank_jobs / "sp_stock" / "results.json").read_text())["stock"]}


@pytest.mark.dist
@pytest.mark.parametrize("arch", ["llama", "zaya", "qwen3_moe"])
def test_two_sp_ranks_equal_one_rank(two_ranks, arch):
    """The summed loss shares and gradients of SP=2 equal the unsharded TidarLM's (ZAYA: through the CCA halo;
    Qwen3-MoE: the balancing loss from the whole row's expert counts)."""
    r = two_ranks["model"][arch]
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
    assert max(r["grad_rel"].values()) < 1e-5, sorted(r["grad_rel"].items(), key=lambda kv: -kv[1])[:3]
    for key in ("loss_ar", "loss_diff", "loss_aux", "tokens_ar", "tokens_diff"):
        assert r["terms"][key] == pytest.approx(r["ref_terms"][key], rel=1e-6, abs=1e-7), key
    if arch == "qwen3_moe":
        assert r["ref_aux"] > 0.5  # the balancing loss is really in the objective


@pytest.mark.dist
@pytest.mark.parametrize("case", ["llama/ar", "zaya/mix/5", "qwen3_moe/ar/3"])
def test_two_sp_ranks_equal_one_rank_with_the_ar_diffusion_target(two_ranks, case):
    """objective.diff_target=ar|mix under SP (with and without loss chunking): the summed shares of the loss, of the
    data CE of the drafts and the summed gradients equal the unsharded objective's. The teacher of a shard's first
    draft is the previous rank's last clean row."""
    r = two_ranks["model"][case]
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
    assert max(r["grad_rel"].values()) < 1e-5, sorted(r["grad_rel"].items(), key=lambda kv: -kv[1])[:3]
    for key in ("loss_ar", "loss_diff", "loss_diff_data", "loss_aux", "tokens_ar", "tokens_diff"):
        assert r["terms"][key] == pytest.approx(r["ref_terms"][key], rel=1e-6, abs=1e-7), key
    assert abs(r["ref_terms"]["loss_diff"] - r["ref_terms"]["loss_diff_data"]) > 1e-3  # the AR target is in the loss


@pytest.mark.dist
def test_aligned_target_needs_the_previous_ranks_row(two_ranks):
    """Negative control: with each rank's own row in place of the previous rank's the sharded loss is wrong."""
    assert abs(two_ranks["model"]["aligned_without_exchange_loss"] - two_ranks["model"]["llama/ar"]["ref_loss"]) > 1e-4


@pytest.mark.dist
def test_zaya_needs_the_halo(two_ranks):
    """Negative control: with the previous rank's halo replaced by zeros the sharded ZAYA loss is wrong."""
    assert abs(two_ranks["model"]["zaya_without_halo_loss"] - two_ranks["model"]["zaya"]["ref_loss"]) > 1e-3


@pytest.mark.dist
def test_flex_core_attention_forward(two_ranks):
    """With flex attention as the gathered attention (run in layout order), the TiDAR BlockMask gives the
    unsharded SDPA loss (forward only: torch 2.13 has no flex backward on CPU; slow: flex attention compiles)."""
    r = two_ranks["flex"]
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5)


@pytest.mark.dist
@pytest.mark.parametrize("case", ["llama", "qwen3_moe/ar", "zaya_window0"])
def test_two_sp_ranks_equal_one_rank_on_a_row_of_4096(two_ranks, case):
    """S = 4096, documents crossing the shard edge, SDPA core in layout order: loss and gradients of one rank.
    ZAYA with cca_time0 = cca_time1 = 1 (no convolution window): the delayed value still reads the previous token,
    which for a shard's first token lives on the previous rank, so the halo is never shorter than 1."""
    r = two_ranks["long"][case]
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
    assert max(r["grad_rel"].values()) < 1e-5, sorted(r["grad_rel"].items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.dist
def test_zaya_without_a_window_needs_a_one_token_halo(two_ranks):
    """Negative control: the old halo sizing (the convolution window, 0 here) gives wrong gradients."""
    r = two_ranks["long"]["zaya_window0_halo0"]
    assert max(r["grad_rel"].values()) > 1e-3  # the right halo: ~4e-6


@pytest.mark.dist
def test_heldout_losses_under_sp_equal_one_rank(two_ranks):
    """The held-out evaluation of `trainer.eval_every` sums the token-weighted shares over the SP group (it once
    logged one rank's share, about 1/P of the loss)."""
    sp, ref = two_ranks["long"]["heldout"]["sp"], two_ranks["long"]["heldout"]["ref"]
    for key in ("loss", "loss_ar", "loss_diff", "tokens_ar", "tokens_diff"):
        assert sp[key] == pytest.approx(ref[key], rel=1e-6), key


@pytest.mark.dist
@pytest.mark.parametrize("arch", ["llama", "zaya", "qwen3_moe"])
def test_flex_core_on_long_rows(two_ranks, arch):
    """SP = 2 with flex attention on one row whose documents cross the shard edge, S = 8192 for Llama and 4096 for
    ZAYA (CCA halo) and Qwen3-MoE (it once failed with NotRunFormError past 2S = 8192: the mask was built over the
    gathered order, where such a document's clean keys form two runs): the one-rank SDPA loss within 1e-4 (forward:
    no flex backward on CPU)."""
    r = two_ranks["flex_long"][arch]
    assert r["seq_len"] >= 4096 and abs(r["loss"] - r["ref_loss"]) < 1e-4


@pytest.mark.dist
def test_four_sp_ranks_through_the_engine_equal_one_rank(tmp_path):
    """One 4-process launch, one SP = 4 group: the DeepSpeed engine at ZeRO-1 and ZeRO-3 gives the one-rank loss and
    gradients (S = 2048); ZAYA without a convolution window gives the one-rank gradients (S = 4096)."""
    import sys
    from pathlib import Path

    from launch import failure_log, run_ranks
    from tiny import env

    out = tmp_path / "sp4.json"
    worker = Path(__file__).parent / "sp_worker.py"
    proc = run_ranks([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                      str(worker), "--modes", "sp4", "--out", str(out)], env=env(), timeout=600)
    assert proc.returncode == 0, failure_log(proc)
    r = json.loads(out.read_text())["sp4"]
    for case in ("zaya_window0", "zero1", "zero3"):
        assert r[case]["loss"] == pytest.approx(r[case]["ref_loss"], rel=1e-6), case
        assert max(r[case]["grad_rel"].values()) < 1e-5, (case, sorted(r[case]["grad_rel"].items(),
                                                                         key=lambda kv: -kv[1])[:3])
    assert r["zero1"]["sp"] == r["zero3"]["sp"] == 4


@pytest.mark.dist
@pytest.mark.parametrize("case", ["zero0", "zero1", "zero2", "zero2_no_rs", "zero3", "zero3_no_rs", "zero1_zaya",
                                  "zero2_qwen3_moe"])
def test_engine_reduction_rule_is_measured_and_gradients_match(two_ranks, case):
    """Through deepspeed.initialize: DeepSpeed's reduced gradient of the raw shares is measured as a multiple of the
    unsharded gradient (ZeRO-0/1/2 and ZeRO-3 without reduce-scatter: the sum, ratio 1; ZeRO-3 with reduce-scatter:
    the mean, ratio 1/2); `loss_scale` must undo exactly that, and the scaled full gradients match the reference."""
    r = two_ranks["engine"][case]
    assert (r["sp"], r["seq_dp"]) == (2, 2)
    assert r["ratio_min"] == pytest.approx(r["ratio_max"], rel=1e-5)
    assert r["ratio_min"] * r["scale"] == pytest.approx(1.0, rel=1e-5)
    assert max(r["grad_rel"].values()) < 1e-5


@pytest.mark.dist
def test_stock_deepspeed_hf_path_drops_the_tidar_mask(two_ranks):
    """Why ar2diff has its own wrapper: DeepSpeed's register_with_transformers replaces the mask by None, so a TiDAR
    mask gives exactly the plain causal output, far from the masked attention ar2diff's wrapper computes."""
    r = two_ranks["stock"]
    assert r["stock_masked_vs_causal"] == 0.0
    assert r["stock_vs_ours"] > 0.1


def test_plan_shard_holds_matching_chunks_of_both_streams():
    plan = plan_shard(8, rank=1, size=2, halo=2)
    assert plan.local_idx.tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    assert plan.gathered_idx.tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15]
    assert plan.halo_idx.tolist() == [2, 3, 10, 11]
    assert plan_shard(8, rank=0, size=2, halo=2).halo_idx.tolist() == [-1, -1, -1, -1]


def test_extended_prev_points_at_the_same_tokens_as_the_unsharded_index():
    """Every local token's stream predecessor, looked up in `[halo | local]`, is the token the unsharded layout
    names (draft block starts look into the clean stream, possibly on the previous rank)."""
    ids = torch.arange(16)[None] + 3
    docs = torch.tensor([[0] * 3 + [1] * 9 + [2] * 4])
    layout = build_tidar_layout(ids, 99, 4, docs)
    for rank in range(2):
        plan = plan_shard(16, rank, 2, halo=3)
        ext = torch.cat([plan.halo_idx, plan.local_idx])
        prev = extended_prev(layout, plan)[0, ext.numel() - plan.local_idx.numel():]
        want = layout.prev_BL[0, plan.local_idx]
        got = torch.where(prev >= 0, ext[prev.clamp(min=0)], -1)
        assert got.tolist() == want.tolist()


@pytest.mark.parametrize("arch, kwargs", [("llama", {}), ("qwen3_moe", {}), ("llama", {"diff_target": "ar"})],
                         ids=["llama", "qwen3_moe", "llama/ar"])
def test_a_one_rank_share_is_the_unsharded_loss(arch, kwargs):
    """In-process (no ranks): the sharded objective over a sequence-parallel "group" of one rank computes the unsharded
    TidarLM loss and terms (the 2-rank checks above need torchrun; ZAYA's halo needs a process group)."""
    import sp_worker

    from ar2diff.model.sequence_shard import SequenceParallel
    from ar2diff.objective.sharded import sharded_tidar_loss

    b = sp_worker.batch()
    ref = sp_worker.tidar_model(arch, **kwargs)(**b, generator=torch.Generator().manual_seed(3))
    one = SequenceParallel(group=None, rank=0, size=1)
    out = sharded_tidar_loss(sp_worker.tidar_model(arch, **kwargs), one, b["input_ids"], b["doc_ids"],
                             loss_mask=b["loss_mask"], generator=torch.Generator().manual_seed(3))
    assert float(out.loss.detach()) == pytest.approx(float(ref.loss.detach()), rel=1e-6)
    for key, value in ref.terms.log_dict().items():
        assert out.terms.log_dict()[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_named_errors():
    with pytest.raises(ValueError, match="seq_len=10 is not divisible by deepspeed.sequence_parallel_size=4"):
        plan_shard(10, 0, 4)
    with pytest.raises(ValueError, match="look-back 3"):
        plan_shard(8, 0, 4, halo=3)

    class Config:
        num_attention_heads, num_key_value_heads = 8, 2

    check_heads(Config, 8)  # KV heads replicated above their count, as DeepSpeed does
    with pytest.raises(ValueError, match="must divide the model's 8 query heads"):
        check_heads(Config, 3)
    Config.num_key_value_heads = 3
    with pytest.raises(ValueError, match="key/value heads"):
        check_heads(Config, 2)


def test_ds_config_carries_sequence_parallel_and_reduce_scatter():
    from ar2diff.trainer.engine import EngineConfig, build_ds_config

    ds = build_ds_config(EngineConfig(zero_stage=3, sequence_parallel_size=2, reduce_scatter=False), world_size=4)
    assert ds["sequence_parallel_size"] == 2 and ds["zero_optimization"]["reduce_scatter"] is False
    assert "sequence_parallel_size" not in build_ds_config(EngineConfig(), world_size=4)


def test_loss_scale_rule():
    assert loss_scale(3, True, 4) == 4.0
    assert [loss_scale(stage, rs, 4) for stage in (0, 1, 2) for rs in (True, False)] == [1.0] * 6
    assert loss_scale(3, False, 4) == 1.0


@pytest.mark.dist
def test_trainer_sp2_matches_one_rank_and_resumes_exactly(tmp_path):
    """The phase trainer with deepspeed.sequence_parallel_size=2 on 2 ranks (tiny ZAYA, ZeRO-1, activation
    checkpointing, mask_ratio 0.5, the mixed diffusion target) logs the one-rank run's losses (same global
    micro-batches), and a run resumed from its step-3 checkpoint logs exactly the uninterrupted run's losses."""
    import shutil

    from tiny import losses, run, train_cmd

    cache = tmp_path / "cache"
    budget = ["budget.tokens=1536", "trainer.ckpt_every=3", "deepspeed.activation_checkpointing=true",
              "objective.diff_target=mix"]  # 6 steps
    run(train_cmd(tmp_path / "one", cache, *budget))
    run(train_cmd(tmp_path / "sp", cache, *budget, "deepspeed.sequence_parallel_size=2", ranks=2))
    one, sp = losses(tmp_path / "one"), losses(tmp_path / "sp")
    assert [s for s, *_ in sp] == list(range(1, 7))
    torch.testing.assert_close(torch.tensor([v[1:] for v in sp]), torch.tensor([v[1:] for v in one]),
                               rtol=1e-5, atol=0)

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "sp", resumed)
    for name in ("checkpoints/step_00000006", "export", "summary.json"):
        shutil.rmtree(resumed / name) if (resumed / name).is_dir() else (resumed / name).unlink()
    proc = run(train_cmd(resumed, cache, *budget, "deepspeed.sequence_parallel_size=2", ranks=2))
    assert "resumed from step 3" in proc.stdout + proc.stderr
    assert losses(resumed) == sp  # bit-exact


@pytest.mark.dist
def test_trainer_sp2_with_two_data_parallel_groups_matches_one_rank(tmp_path):
    """4 ranks = 2 sequence-parallel groups of 2 (SP=2 x DP=2, ZeRO-1, the AR diffusion target) log the one-rank
    run's losses: each group takes its own rows of the global batch, and the gradients are reduced across groups."""
    from tiny import losses, run, train_cmd

    cache = tmp_path / "cache"
    budget = ["budget.tokens=1024", "deepspeed.activation_checkpointing=true", "objective.diff_target=ar"]  # 4 steps
    run(train_cmd(tmp_path / "one", cache, *budget))
    run(train_cmd(tmp_path / "sp", cache, *budget, "deepspeed.sequence_parallel_size=2", ranks=4), timeout=600)
    one, sp = losses(tmp_path / "one"), losses(tmp_path / "sp")
    assert [s for s, *_ in sp] == list(range(1, 5))
    torch.testing.assert_close(torch.tensor([v[1:] for v in sp]), torch.tensor([v[1:] for v in one]),
                               rtol=1e-5, atol=0)
    summary = json.loads((tmp_path / "sp" / "summary.json").read_text())
    assert summary["budget"]["data_parallel_size"] == 2 and summary["budget"]["grad_accum_steps"] == 1


@pytest.mark.parametrize("overrides, match", [
    (["data.seq_len=250"], "data.seq_len=250 is not divisible by deepspeed.sequence_parallel_size=4"),
    (["model.config.num_attention_heads=6", "model.config.num_key_value_heads=2", "model.config.head_dim=16"],
     "must divide the model's 6 query heads"),
    (["model.attn_implementation=eager"], "model.attn_implementation='eager' cannot run under sequence parallelism"),
    (["phase=ar_pretrain", "objective=ar"], "needs objective.kind=tidar"),
    (["deepspeed.zero_stage=3", "deepspeed.expert_parallel_size=2"], "AutoEP on ZeRO-3 has no sequence parallelism"),
    (["deepspeed.zero_stage=2", "deepspeed.expert_parallel_size=2"], "AutoEP replaces the router"),
    # ZAYA's CCA reads (10 - 1) + (9 - 1) = 17 positions back: more than the 16 each of 4 shards of 64 holds
    (["model=tiny_zaya", "data.seq_len=64", "+model.config.cca_time0=10", "+model.config.cca_time1=9"],
     "holds data.seq_len / deepspeed.sequence_parallel_size = 16 positions per stream, fewer than the 17 positions"),
])
def test_sequence_parallel_config_errors_name_the_key(overrides, match):
    from ar2diff.config.compose import compose

    cfg = compose(["deepspeed.sequence_parallel_size=4", "data.seq_len=256", *overrides])
    with pytest.raises(ValueError, match=match):
        cfg.validate(world_size=8)


def test_sequence_parallel_config_that_fits_validates():
    from ar2diff.config.compose import compose

    compose(["deepspeed.sequence_parallel_size=4", "data.seq_len=256"]).validate(world_size=8)
    for window in ("1", "9"):  # look-back max(1, 0) = 1, and (9 - 1) * 2 = 16: exactly a shard of 64 / 4
        compose(["deepspeed.sequence_parallel_size=4", "model=tiny_zaya", "data.seq_len=64",
                 f"+model.config.cca_time0={window}", f"+model.config.cca_time1={window}"]).validate(world_size=8)


def test_the_zaya_look_back_of_a_saved_model_is_checked_from_its_config_json(tmp_path):
    """model.path: the look-back is read from config.json at validation, before any weight or data is touched."""
    from ar2diff.config.compose import compose

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "zaya", "cca_time0": 10, "cca_time1": 9,
                                                      "num_attention_heads": 8}))
    cfg = compose(["deepspeed.sequence_parallel_size=4", "data.seq_len=64", f"model.path={tmp_path}",
                   "model.config=null"])
    with pytest.raises(ValueError, match="fewer than the 17 positions ZAYA's CCA reads"):
        cfg.validate(world_size=8)
    aligned = compose(["deepspeed.sequence_parallel_size=4", "data.seq_len=256", "objective.diff_target=mix"])
    assert aligned.validate(world_size=8).objective.diff_target == "mix"  # the teacher row crosses shard edges
