"""Roofline speedup projection: hand-computed cases in each regime, limits, monotonicity, MoE expert hits."""

import math

import pytest

from ar2diff.decode.projection import (
    ACCELERATORS,
    H100_SXM,
    MI300X,
    MI355X,
    Accelerator,
    ModelShape,
    expected_experts_hit,
    forward_cost,
    project_speedup,
    tokens_per_forward,
)

# Tiny dense model: 1e6 params, 1 layer, width 4, one KV head of 4. At context 10 one token costs
# 2 * 1e6 + 4 * 1 * 4 * 10 = 2_000_160 FLOPs; the weights are 2e6 bytes and the KV cache 2*1*1*4*10*2 = 160
# bytes, so a forward reads 2_000_160 bytes. TiDAR with block 4, 4 drafts and 1 template feeds 8 tokens.
TINY = ModelShape(total_params=1e6, active_params=1e6, num_layers=1, hidden_size=4, num_kv_heads=1, head_dim=4)
UNIFORM_0_TO_4 = [1, 1, 1, 1, 1]  # mean accepted 2 -> 3 tokens per forward
SETTINGS = dict(block_size=4, num_templates=1, context=10)


def test_hand_computed_memory_bound():
    # 1e12 FLOP/s, 1e9 B/s: AR compute 2.00016e-6 s, memory 2.00016e-3 s; TiDAR compute 8x that, memory equal.
    out = project_speedup(UNIFORM_0_TO_4, TINY, Accelerator("toy", 1e12, 1e9), **SETTINGS)
    assert out["tokens_per_forward"] == 3.0 and out["tidar_input_tokens_per_seq"] == 8
    assert out["ar"]["flops"] == 2_000_160 and out["tidar"]["flops"] == 8 * 2_000_160
    assert out["ar"]["weight_bytes"] == 2e6 and out["ar"]["kv_bytes"] == 160
    assert math.isclose(out["ar"]["time_s"], 2.00016e-3) and out["ar"]["bound"] == "memory"
    assert math.isclose(out["tidar"]["time_s"], 2.00016e-3) and out["tidar"]["bound"] == "memory"
    assert math.isclose(out["speedup"], 3.0)
    assert math.isclose(out["ar_tokens_per_s"], 1 / 2.00016e-3)


def test_hand_computed_compute_bound():
    # 1e9 FLOP/s, 1e12 B/s: both forwards compute-bound, TiDAR does 8x the work for 3x the tokens.
    out = project_speedup(UNIFORM_0_TO_4, TINY, Accelerator("toy", 1e9, 1e12), **SETTINGS)
    assert out["ar"]["bound"] == "compute" and out["tidar"]["bound"] == "compute"
    assert math.isclose(out["ar"]["time_s"], 2.00016e-3) and math.isclose(out["tidar"]["time_s"], 1.600128e-2)
    assert math.isclose(out["speedup"], 3 / 8)


def test_hand_computed_mixed_regime():
    # 4e9 FLOP/s, 1e9 B/s: AR memory-bound (2.00016e-3 s), TiDAR compute-bound (16_001_280 / 4e9 = 4.00032e-3 s).
    out = project_speedup(UNIFORM_0_TO_4, TINY, Accelerator("toy", 4e9, 1e9), **SETTINGS)
    assert out["ar"]["bound"] == "memory" and out["tidar"]["bound"] == "compute"
    assert math.isclose(out["tidar"]["time_s"], 4.00032e-3)
    assert math.isclose(out["speedup"], 1.5)


DENSE_8B = ModelShape(8e9, 8e9, num_layers=32, hidden_size=4096, num_kv_heads=8, head_dim=128)


@pytest.mark.parametrize("histogram", [[1], [0, 0, 1], [5, 3, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]])
def test_free_compute_gives_tokens_per_forward_for_dense_models(histogram):
    free_compute = Accelerator("free", math.inf, MI300X.mem_bandwidth_bytes_per_s)
    out = project_speedup(histogram, DENSE_8B, free_compute, block_size=16, num_templates=3)
    assert math.isclose(out["speedup"], tokens_per_forward(histogram), rel_tol=1e-12)
    # A real MI300X at batch 1 is memory-bound for both forwards, so the same holds there.
    real = project_speedup(histogram, DENSE_8B, MI300X, block_size=16, num_templates=3)
    assert real["tidar"]["bound"] == "memory"
    assert math.isclose(real["speedup"], tokens_per_forward(histogram), rel_tol=1e-12)


def test_compute_bound_speedup_drops_with_batch_towards_tpf_over_input_tokens():
    histogram = {0: 1, 8: 2, 16: 1}  # TPF 9
    # Short context: at long context the per-sequence KV reads keep large-batch AR memory-bound too.
    speedups = [
        project_speedup(histogram, DENSE_8B, MI300X, block_size=16, num_templates=3, batch=b, context=512)["speedup"]
        for b in (1, 4, 16, 64, 256, 1024)
    ]
    assert all(b <= a for a, b in zip(speedups, speedups[1:])) and speedups[0] > speedups[-1]
    assert speedups[-1] < 1  # 64 input tokens per sequence cost more than the 9 tokens they bring
    free_memory = Accelerator("free", MI300X.peak_bf16_flops, math.inf)
    out = project_speedup(histogram, DENSE_8B, free_memory, block_size=16, num_templates=3)
    assert math.isclose(out["speedup"], 9 / 64)


def test_speedup_is_monotone_in_tokens_per_forward():
    outs = []
    for accepted in range(17):
        histogram = [0] * 17
        histogram[accepted] = 1
        outs.append(project_speedup(histogram, DENSE_8B, H100_SXM, block_size=16, num_templates=3, batch=32))
    speedups = [o["speedup"] for o in outs]
    assert all(b > a for a, b in zip(speedups, speedups[1:]))
    # Forward times do not depend on the histogram, so the speedup is proportional to TPF.
    assert all(math.isclose(o["speedup"] / o["tokens_per_forward"], speedups[0]) for o in outs)


def test_expected_experts_hit():
    assert expected_experts_hit(16, 1, 0) == 0
    assert math.isclose(expected_experts_hit(16, 1, 1), 1)
    assert math.isclose(expected_experts_hit(16, 2, 1), 2)
    assert math.isclose(expected_experts_hit(4, 1, 8), 4 * (1 - 0.75**8))
    assert math.isclose(expected_experts_hit(16, 1, 10_000), 16)
    assert expected_experts_hit(1, 1, 5) == 1


def test_moe_pays_for_the_extra_experts_a_wide_forward_touches():
    # 4 experts, top-1: per expert (5e6 - 2e6) / 3 = 1e6 params, routed 4e6, always-touched 1e6.
    moe = ModelShape(5e6, 2e6, 1, hidden_size=4, num_kv_heads=1, head_dim=4, num_experts=4, experts_per_token=1)
    assert moe.routed_params == 4e6
    free_compute = Accelerator("free", math.inf, 1e9)
    out = project_speedup(UNIFORM_0_TO_4, moe, free_compute, **SETTINGS)
    hit = 4 * (1 - 0.75**8)
    assert out["ar"]["weight_bytes"] == 2 * (1e6 + 1e6)
    assert math.isclose(out["tidar"]["weight_bytes"], 2 * (1e6 + 1e6 * hit))
    assert math.isclose(out["speedup"], 3 * (4e6 + 160) / (2 * (1e6 + 1e6 * hit) + 160))
    assert out["speedup"] < 3 / 2
    # Batch b at AR: b tokens route too, so AR's expert reads grow with batch as well.
    ar = forward_cost(moe, free_compute, tokens_per_seq=1, batch=8, context=10)
    assert math.isclose(ar.experts_hit_per_layer, hit)
    # A measured expert count replaces the uniform-routing assumption: one expert per forward is dense-like.
    one_expert = project_speedup(UNIFORM_0_TO_4, moe, free_compute, **SETTINGS, experts_hit=lambda tokens: 1.0)
    assert one_expert["tidar"]["weight_bytes"] == out["ar"]["weight_bytes"]
    assert math.isclose(one_expert["speedup"], 3.0)
    with pytest.raises(ValueError, match=r"experts_hit\(1\) returned 5.0"):
        project_speedup(UNIFORM_0_TO_4, moe, free_compute, **SETTINGS, experts_hit=lambda tokens: 5.0)


def test_presets():
    assert MI300X == Accelerator("MI300X", 1307.4e12, 5.3e12)
    assert MI355X == Accelerator("MI355X", 2.5e15, 8.0e12)
    assert H100_SXM == Accelerator("H100 SXM", 989e12, 3.35e12)
    assert set(ACCELERATORS) == {"MI300X", "MI355X", "H100 SXM"}


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="accepting 5 drafts but num_drafts is 4"):
        project_speedup([0, 0, 0, 0, 0, 1], TINY, MI300X, **SETTINGS)
    with pytest.raises(ValueError, match="histogram must map"):
        project_speedup([0, 0], TINY, MI300X, **SETTINGS)
    with pytest.raises(ValueError, match="histogram must map"):
        tokens_per_forward({0: 1, 1: -1})
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        project_speedup([1], TINY, MI300X, block_size=4, num_templates=1, batch=0)
    with pytest.raises(ValueError, match="active_params <= total_params"):
        ModelShape(1e6, 2e6, 1, 4, 1, 4)
    with pytest.raises(ValueError, match="dense model"):
        ModelShape(5e6, 2e6, 1, 4, 1, 4)  # MoE totals without num_experts
