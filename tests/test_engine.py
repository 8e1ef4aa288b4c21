"""EngineConfig validation, the DeepSpeed config dict, parameter/FLOP counts, and single-rank engines (CPU, gloo).

The single-rank runs train a tiny HF Llama in this process under ZeRO 0/1/2/3 with the same data and fp32: the
optimizer maths is the same elementwise AdamW on the same gradients, so the loss trajectories agree to float
rounding (rtol 1e-6), and the LambdaLR from schedule.py sets the LR each step.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ar2diff" / "torch_extensions"))

from ar2diff.trainer.engine import (EngineConfig, autoep_layer_overrides, build_ds_config,  # noqa: E402
                                    build_engine, count_params, flops_per_token, optimizer_param_groups)
from ar2diff.trainer.schedule import ScheduleConfig, lr_at  # noqa: E402


import dist_worker as worker  # noqa: E402  (tests/ is on sys.path, like tiny.py)


@pytest.mark.parametrize("changes, world_size, key", [
    ({"zero_stage": 4}, 1, "deepspeed.zero_stage"),
    ({"precision": "fp16"}, 1, "deepspeed.precision"),
    ({"micro_batch_size": 0}, 1, "deepspeed.micro_batch_size"),
    ({"grad_accum_steps": 0}, 1, "deepspeed.grad_accum_steps"),
    ({"expert_parallel_size": 2}, 3, "deepspeed.expert_parallel_size"),
    ({"sequence_parallel_size": 4}, 2, "deepspeed.sequence_parallel_size"),
    ({"expert_parallel_size": 2, "sequence_parallel_size": 2, "zero_stage": 3}, 4, "deepspeed.sequence_parallel_size"),
    ({"grad_clip": -1.0}, 1, "deepspeed.grad_clip"),
    ({"weight_decay": -0.1}, 1, "deepspeed.weight_decay"),
    ({"betas": (0.9, 1.0)}, 1, "deepspeed.betas"),
    ({"eps": 0.0}, 1, "deepspeed.eps"),
    ({"offload_optimizer": True, "zero_stage": 0}, 1, "deepspeed.offload_optimizer"),
    ({"offload_params": True, "zero_stage": 2}, 1, "deepspeed.offload_params"),
])
def test_validate_rejects_with_the_key(changes, world_size, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        EngineConfig(**changes).validate(world_size)


def test_validate_accepts_good_configs():
    EngineConfig().validate(1)
    EngineConfig(zero_stage=3, expert_parallel_size=4, precision="fp32").validate(8)
    EngineConfig(zero_stage=3, offload_params=True, offload_optimizer=True).validate(2)


def test_ds_config_batch_zero_precision():
    cfg = EngineConfig(zero_stage=2, precision="bf16", micro_batch_size=2, grad_accum_steps=3, grad_clip=0.5)
    ds = build_ds_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 2 * 3 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["bf16"] == {"enabled": True} and ds["gradient_clipping"] == 0.5
    assert "optimizer" not in ds and "scheduler" not in ds and "expert_parallel" not in ds
    assert build_ds_config(EngineConfig(precision="fp32"), 1)["bf16"] == {"enabled": False}


def test_ds_config_sequence_parallel_ranks_share_data():
    cfg = EngineConfig(micro_batch_size=1, grad_accum_steps=2, sequence_parallel_size=2)
    assert build_ds_config(cfg, world_size=8)["train_batch_size"] == 1 * 2 * 4


def test_ds_config_autoep():
    cfg = EngineConfig(zero_stage=2, expert_parallel_size=2)
    assert build_ds_config(cfg, 4, on_cpu=True)["expert_parallel"] == {
        "enabled": True, "autoep_size": 2, "use_grouped_mm": False}
    assert build_ds_config(cfg, 4, on_cpu=False)["expert_parallel"]["use_grouped_mm"] is True
    forced = EngineConfig(expert_parallel_size=2, expert_grouped_mm=False)
    assert build_ds_config(forced, 2, on_cpu=False)["expert_parallel"]["use_grouped_mm"] is False
    with pytest.raises(ValueError, match=r"deepspeed\.expert_parallel_size"):
        build_ds_config(cfg, 3)


def test_autoep_pattern_follows_a_wrapper():
    assert autoep_layer_overrides(worker.tiny_qwen3_moe()) == {}  # the preset's own pattern fits
    assert autoep_layer_overrides(worker.Wrapper(worker.tiny_qwen3_moe())) == {
        "preset_model": "qwen3_moe", "moe_layer_pattern": r"lm\.model\.layers\.\d+\.mlp"}
    assert autoep_layer_overrides(worker.Wrapper(worker.tiny_llama())) == {}  # dense: nothing for AutoEP
    overrides = {"preset_model": "qwen3_moe", "moe_layer_pattern": "x"}
    ds = build_ds_config(EngineConfig(expert_parallel_size=2), 2, autoep_overrides=overrides)
    assert ds["expert_parallel"]["moe_layer_pattern"] == "x" and ds["expert_parallel"]["autoep_size"] == 2


def test_ds_config_offload():
    ds = build_ds_config(EngineConfig(zero_stage=3, offload_optimizer=True, offload_params=True), 1)
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                       "offload_param": {"device": "cpu"}}
    assert ds["zero_force_ds_cpu_optimizer"] is False  # keep the torch AdamW under ZeRO-Offload


def test_optimizer_groups_split_matrices_from_vectors():
    model = worker.tiny_llama()
    decay, no_decay = optimizer_param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    # 2 layers x 7 projections + embeddings + lm_head; 2 layers x 2 norms + final norm.
    assert len(decay["params"]) == 2 * 7 + 2 and len(no_decay["params"]) == 2 * 2 + 1


def test_count_params_dense_by_hand():
    # Per layer: q 32x32, k 16x32, v 16x32, o 32x32, gate/up 64x32, down 32x64, 2 norms of 32.
    layer = 32 * 32 * 2 + 16 * 32 * 2 + 64 * 32 * 3 + 2 * 32
    total = 2 * layer + 128 * 32 * 2 + 32  # + embeddings, untied lm_head, final norm
    count = count_params(worker.tiny_llama())
    assert count.total == total == 26784
    assert count.active == total
    assert count.matmul_active == total - 128 * 32  # the embedding lookup is not a matmul


def test_count_params_moe_by_hand():
    # Experts per layer: gate_up 4x64x32 + down 4x32x32 = 12288; a token uses 2 of the 4 experts.
    count = count_params(worker.tiny_qwen3_moe())
    experts = 2 * (4 * 64 * 32 + 4 * 32 * 32)
    assert count.active == count.total - experts // 2
    assert count.matmul_active == count.active - 128 * 32


def test_flops_per_token_by_hand():
    config = worker.tiny_llama().config
    # 6 * N (matmul params) + 12 * layers * heads * head_dim * seq_len
    assert flops_per_token(config, 16) == 6 * 22688 + 12 * 2 * 4 * 8 * 16
    assert flops_per_token(config, 16, matmul_active_params=1000) == 6 * 1000 + 12 * 2 * 4 * 8 * 16
    moe = worker.tiny_qwen3_moe().config
    assert flops_per_token(moe, 32) == 6 * count_params(worker.tiny_qwen3_moe()).matmul_active + 12 * 2 * 4 * 8 * 32


def single_rank_spec(name: str, **engine) -> dict:
    return {"name": name, "model": "llama",
            "engine": {"precision": "fp32", "micro_batch_size": worker.GLOBAL_BATCH, **engine}}


@pytest.fixture(scope="module")
def single_rank_runs() -> dict:
    """ZeRO 0/1/2/3 and ZeRO-0 with activation checkpointing, trained in this process as a one-rank world."""
    specs = [single_rank_spec(f"zero{stage}", zero_stage=stage) for stage in range(4)]
    # Checkpointing is switched on in the HF model inside a wrapper, as ar2diff's TiDAR model holds it.
    specs.append({**single_rank_spec("zero0_ckpt", zero_stage=0, activation_checkpointing=True), "wrap": True})
    return {spec["name"]: worker.run(spec) for spec in specs}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_single_rank_zero_stages_learn_and_agree(single_rank_runs, stage):
    losses = single_rank_runs[f"zero{stage}"]["losses"]
    assert len(losses) == worker.STEPS
    assert losses[-1] < losses[0] - 1.0  # memorising one batch: ~4.84 -> ~3.43
    assert losses == pytest.approx(single_rank_runs["zero0"]["losses"], rel=1e-6)


def test_single_rank_lr_follows_schedule(single_rank_runs):
    schedule = ScheduleConfig(**worker.SCHEDULE)
    expected = [lr_at(step, schedule, worker.STEPS) for step in range(worker.STEPS)]
    assert expected == pytest.approx([1e-2, 2e-2, 2e-2, 1.1e-2, 2e-3], rel=1e-12)
    for stage in range(4):
        assert single_rank_runs[f"zero{stage}"]["lrs"] == pytest.approx(expected, rel=1e-12)


def test_zero_grad_norms_agree(single_rank_runs):
    # ZeRO-0 does not keep the norm; stages 1-3 do and must agree.
    assert single_rank_runs["zero0"]["grad_norms"] == [None] * worker.STEPS
    for stage in (2, 3):
        assert single_rank_runs[f"zero{stage}"]["grad_norms"] == pytest.approx(
            single_rank_runs["zero1"]["grad_norms"], rel=1e-5)


def test_activation_checkpointing_keeps_the_trajectory(single_rank_runs):
    run = single_rank_runs["zero0_ckpt"]
    assert run["gradient_checkpointing"] is True
    assert not single_rank_runs["zero0"]["gradient_checkpointing"]
    assert run["losses"] == pytest.approx(single_rank_runs["zero0"]["losses"], rel=1e-6)


def test_build_engine_validates_against_the_world():
    cfg = EngineConfig(sequence_parallel_size=2, precision="fp32")  # a 1-rank world cannot split a sequence
    with pytest.raises(ValueError, match=r"deepspeed\.sequence_parallel_size"):
        build_engine(worker.tiny_llama(), cfg, ScheduleConfig(), total_steps=10)
