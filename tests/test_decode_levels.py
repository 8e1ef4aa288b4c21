"""`--levels auto`: the chain model of decoding with a level set against the decoder's own rules, the choice per
hardware, and never worse than "all" or Zyphra's levels."""

import numpy as np
import pytest

from ar2diff.decode.levels import (accelerator_cost, acceptance_law, chain_tpf, choose_levels, zyphra_levels)
from ar2diff.decode.projection import ModelShape
from ar2diff.decode.step_layout import level_for, next_draft_rows, step_levels

HIST8 = [30, 10, 8, 6, 5, 5, 4, 11]
DENSE = ModelShape(total_params=1.5e9, active_params=1.5e9, num_layers=28, hidden_size=1536, num_kv_heads=2,
                   head_dim=128, num_query_heads=12)
MOE = ModelShape(total_params=8.4e9, active_params=0.76e9, num_layers=40, hidden_size=2048, num_kv_heads=2,
                 head_dim=128, num_query_heads=8, num_experts=16, experts_per_token=1)


def simulate(law, levels, block_size, steps=60_000, seed=0):
    """Tokens per forward of the decoder's level rules (step_layout) with accepted = min(A, drafts)."""
    rng = np.random.default_rng(seed)
    draws = rng.choice(len(law), size=steps, p=law)
    k, tokens = 0, 0
    for A in draws:
        drafted = step_levels(levels, k)
        a = min(int(A), k)
        tokens += a + 1
        level = level_for(a, drafted)
        k = 0 if level is None else len(range(*next_draft_rows(level, a, block_size).indices(block_size)))
    return tokens / steps


@pytest.mark.parametrize("levels", [(0,), (2, 4, 5), (3,), (1, 6), tuple(range(8))])
def test_chain_matches_a_simulation_of_the_decoder_rules(levels):
    law = acceptance_law(HIST8, 8)
    mask = np.isin(np.arange(8), levels)[None]
    assert chain_tpf(law, mask)[0] == pytest.approx(simulate(law, "all" if len(levels) == 8 else levels, 8),
                                                    rel=0.02)


def test_all_levels_give_the_histogram_tpf():
    law = acceptance_law(HIST8, 8)
    assert chain_tpf(law, np.ones((1, 8), bool))[0] == pytest.approx((law * np.arange(8)).sum() + 1, rel=1e-6)


def test_zyphra_levels_scale_with_the_block():
    assert zyphra_levels(16) == (4, 7, 10)
    assert zyphra_levels(8) == (2, 4, 5)
    assert zyphra_levels(32) == (8, 14, 20)
    assert zyphra_levels(4) == (1, 2, 3)
    assert zyphra_levels(2) is None  # no three distinct levels in [1, 1]


def test_hardware_changes_the_choice_where_the_cost_model_does_and_never_loses():
    # batch 8 on a dense 1.5B: MI300X's lower FLOP/byte ridge makes wide forwards compute-bound earlier
    report = choose_levels(HIST8, 8, {hw: accelerator_cost(DENSE, hw, batch=8) for hw in ("mi300x", "mi355x")})
    assert report["mi300x"]["chosen"]["levels"] != report["mi355x"]["chosen"]["levels"]
    assert len(report["mi300x"]["chosen"]["levels"]) < len(report["mi355x"]["chosen"]["levels"])
    # memory-bound (batch 1) vs compute-bound (a cost linear in width): "all" vs one template
    flat = choose_levels(HIST8, 8, {"flat": lambda t: 1.0, "linear": lambda t: float(t)})
    assert flat["flat"]["chosen"]["levels"] == list(range(8))
    assert len(flat["linear"]["chosen"]["levels"]) == 1
    for shape, batch in ((DENSE, 1), (DENSE, 16), (MOE, 1), (MOE, 64)):
        for block, hist in ((8, HIST8), (16, [30, 10, 8, 6, 5, 5, 4, 4, 3, 3, 3, 2, 2, 2, 2, 11])):
            costs = {hw: accelerator_cost(shape, hw, batch=batch) for hw in ("mi300x", "mi355x", "h100")}
            for r in choose_levels(hist, block, costs).values():
                assert r["chosen"]["speedup"] >= r["all"]["speedup"] - 1e-12
                assert r["chosen"]["speedup"] >= r["zyphra"]["speedup"] - 1e-12


def test_bad_histogram_named():
    with pytest.raises(ValueError, match="block_size=4"):
        acceptance_law([1, 2, 3, 4, 5], 4)
