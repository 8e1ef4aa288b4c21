"""Distributed start-up, and real 2-rank engines (``torchrun --nproc_per_node 2``, gloo, CPU) against one rank.

All 2-rank configurations (ZeRO-2, ZeRO-3, AutoEP expert-parallel 2 on ZeRO-2 and on ZeRO-3 with the HF model
inside a wrapper module, bf16 on ZeRO-1) run one after another in the same ranks (``tests/dist_worker.py``), in
the session's one 2-rank launch (the ``rank_jobs`` fixture, tests/rank_jobs.py): torchrun start-up is the cost,
so it is paid once.

Why the trajectories must agree: every run sees the same global batch of 4 sequences per optimizer step, all
tokens labelled, so the mean over ranks of the per-rank mean loss is the global mean loss and DeepSpeed's
gradient average is the gradient of the global mean. Dense: 2 ranks x micro 2 against 1 rank x micro 4.
MoE: Qwen3-MoE's router aux loss is a nonlinear function of its micro-batch's routing statistics, so the 1-rank
reference uses micro 2 x 2 accumulation steps over the same two micro-batches the ranks see; the objective is then
identical and only float reassociation (AutoEP's own router and expert loop, the all-reduce) differs, which stays
orders of magnitude below rtol 1e-4 over 5 steps (measured: agreement to ~1e-7).
"""

import json
import math
import os
from pathlib import Path

import pytest

from ar2diff.trainer.distributed import LAUNCHER_ENV, init_distributed, single_process_env

EXTENSIONS_DIR = str(Path.home() / ".cache" / "ar2diff" / "torch_extensions")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS_DIR)


import dist_worker as worker  # noqa: E402  (tests/ is on sys.path, like tiny.py)

FP32 = {"precision": "fp32"}
TWO_RANK_SPECS = [
    {"name": "zero2", "model": "llama", "engine": {**FP32, "zero_stage": 2, "micro_batch_size": 2}},
    {"name": "zero3", "model": "llama", "engine": {**FP32, "zero_stage": 3, "micro_batch_size": 2}},
    {"name": "autoep2_zero2", "model": "qwen3_moe",
     "engine": {**FP32, "zero_stage": 2, "micro_batch_size": 2, "expert_parallel_size": 2}},
    {"name": "autoep2_zero3", "model": "qwen3_moe", "wrap": True,  # also: AutoEP finds a wrapped model's layers
     "engine": {**FP32, "zero_stage": 3, "micro_batch_size": 2, "expert_parallel_size": 2}},
    {"name": "bf16_zero1", "model": "llama", "engine": {"precision": "bf16", "zero_stage": 1, "micro_batch_size": 2}},
]
ONE_RANK_SPECS = [
    {"name": "dense", "model": "llama", "engine": {**FP32, "zero_stage": 2, "micro_batch_size": 4}},
    {"name": "moe", "model": "qwen3_moe",
     "engine": {**FP32, "zero_stage": 2, "micro_batch_size": 2, "grad_accum_steps": 2}},
]


def test_single_process_env_fills_a_one_rank_world():
    added = single_process_env({})
    assert {key: added[key] for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    assert 0 < int(added["MASTER_PORT"]) < 65536
    assert set(added) == set(LAUNCHER_ENV)


def test_single_process_env_leaves_a_launch_alone():
    launched = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert single_process_env(launched) == {}


def test_single_process_env_rejects_half_a_launch():
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        single_process_env({"RANK": "0", "WORLD_SIZE": "1"})
    with pytest.raises(ValueError, match="MASTER_PORT"):
        single_process_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})


def test_init_distributed_single_process_is_idempotent():
    first = init_distributed()
    rank, world_size, local_rank, device = first
    assert (rank, world_size, local_rank, device.type) == (0, 1, 0, "cpu")
    assert init_distributed() == first


RANK_JOBS = {"dist": {"specs": TWO_RANK_SPECS}}  # for the rank_jobs fixture (tests/conftest.py)


@pytest.fixture(scope="module")
def two_rank_runs(rank_jobs) -> dict:
    """Every TWO_RANK_SPECS run, from the session's one ``torchrun --nproc_per_node 2`` launch."""
    return json.loads((rank_jobs / "dist" / "results.json").read_text())


@pytest.fixture(scope="module")
def one_rank_runs() -> dict:
    """The references, trained in this process as a one-rank world on the same global batches."""
    return {spec["name"]: worker.run(spec) for spec in ONE_RANK_SPECS}


@pytest.mark.dist
@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_two_rank_zero_matches_one_rank(two_rank_runs, one_rank_runs, name):
    run, reference = two_rank_runs[name], one_rank_runs["dense"]
    assert run["losses"][-1] < run["losses"][0] - 1.0
    assert run["losses"] == pytest.approx(reference["losses"], rel=1e-4)
    assert run["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-4)
    assert run["lrs"] == pytest.approx(reference["lrs"], rel=1e-12)


@pytest.mark.dist
@pytest.mark.parametrize("name", ["autoep2_zero2", "autoep2_zero3"])
def test_autoep_matches_one_rank_without_ep(two_rank_runs, one_rank_runs, name):
    run, reference = two_rank_runs[name], one_rank_runs["moe"]
    assert run["moe_param_groups"] >= 1 and reference["moe_param_groups"] == 0
    assert run["losses"][-1] < run["losses"][0] - 1.0
    assert run["losses"] == pytest.approx(reference["losses"], rel=1e-4)
    assert run["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-4)


@pytest.mark.dist
def test_autoep_outputs_the_router_aux_loss(two_rank_runs, one_rank_runs):
    # Rank 0 trains on chunk 0 every step, as does the reference's first micro-step (index 2 * step): with the
    # same weights the aux loss AutoEP's router reports must be HF's.
    aux, reference_aux = two_rank_runs["autoep2_zero2"]["aux_losses"], one_rank_runs["moe"]["aux_losses"]
    assert len(aux) == worker.STEPS and all(value is not None and math.isfinite(value) for value in aux)
    assert aux == pytest.approx(reference_aux[::2], rel=1e-4)
    assert all(value is None for value in two_rank_runs["zero2"]["aux_losses"])


@pytest.mark.dist
def test_bf16_tracks_fp32(two_rank_runs, one_rank_runs):
    # bf16 weights/activations with fp32 master weights: same curve within bf16 rounding (8 mantissa bits,
    # ~0.4% per op; measured <= 1.3% over 5 steps), and still learning.
    run = two_rank_runs["bf16_zero1"]
    assert run["losses"][-1] < run["losses"][0] - 1.0
    assert run["losses"] == pytest.approx(one_rank_runs["dense"]["losses"], rel=3e-2)
