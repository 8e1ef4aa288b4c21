"""Router load recording and ZAYA's bias balancing (ar2diff.model.router_balance)."""

import pytest
import torch

from ar2diff.config.router import RouterBalanceConfig
from ar2diff.model.router_balance import LoadRecorder, RouterBalancer, biased_choice, load_metrics
from tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def skewed_zaya(raise_by: float = 1.0):
    lm = tiny_model("zaya").train()
    for m in lm.modules():
        if hasattr(m, "balancing_biases"):
            m.balancing_biases[0] += raise_by  # expert 0 wins every token
    return lm


def batch(seed: int = 0, rows: int = 8, length: int = 64) -> torch.Tensor:
    return torch.randint(3, 96, (rows, length), generator=torch.Generator().manual_seed(seed))


def balanced(per_layer: dict) -> bool:
    return all(0.5 <= m["min_load"] and m["max_load"] <= 2.0 for m in per_layer.values())


def test_recorded_choice_is_the_class_the_router_takes_skip_included():
    lm = tiny_model("zaya").train()
    router = lm.model.layers[0].mlp.gate
    router.balancing_biases[-1] = 0.6  # the skip class now wins some tokens
    seen = {}
    router.register_forward_hook(lambda m, a, out: seen.update(indices=out[2].reshape(-1).clone(),
                                                              logits=out[0].clone()))
    rec = LoadRecorder(lm)
    with torch.no_grad():
        lm(batch())
    choice = biased_choice(router, seen["logits"]).reshape(-1)
    skip = choice == router.num_experts
    assert skip.any() and (~skip).any()
    assert torch.equal(seen["indices"][~skip], choice[~skip])  # the experts that ran are the recorded ones
    assert torch.equal(seen["indices"][skip], torch.zeros_like(choice[skip]))  # transformers hides skip as 0
    counts = rec.take("cpu")[0]
    assert counts.tolist() == torch.bincount(choice, minlength=5).double().tolist()


def test_eval_forwards_are_not_recorded():
    lm = tiny_model("zaya").eval()
    rec = LoadRecorder(lm)
    with torch.no_grad():
        lm(batch())
    assert rec.take("cpu").sum() == 0


def test_load_metrics_by_hand():
    m = load_metrics(torch.tensor([6.0, 2.0, 2.0, 0.0, 10.0]), num_experts=4, has_skip=True)
    assert m["max_load"] == pytest.approx(0.6 * 4) and m["min_load"] == 0.0
    assert m["load_ratio"] == 6.0 and m["skip_share"] == 0.5  # zero-token expert counted as one token
    assert load_metrics(torch.tensor([5.0, 5.0, 5.0, 5.0]), 4, False)["load_entropy"] == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.parametrize("rule,rate,steps,within", [("pid", 0.01, 140, 100), ("sign", 0.005, 200, 170)])
def test_skewed_router_becomes_balanced(rule, rate, steps, within):
    """Expert 0's bias raised by 1 in every layer: it takes every token. The controller balances the load (every
    expert 0.5x-2x uniform in every layer) within `within` steps (measured: pid 69, sign 146), and the last 40
    steps together stay balanced (per step, 512 tokens over 4 experts, the shares are noisier)."""
    lm = skewed_zaya()
    bal = RouterBalancer(lm, RouterBalanceConfig(rule=rule, update_rate=rate))
    history, tail = [], None
    for step in range(1, steps + 1):
        with torch.no_grad():
            lm(batch(step))
        counts = bal.global_counts("cpu")
        history.append(bal.metrics(counts))
        tail = counts if step == steps - 39 else tail + counts if tail is not None else None
        bal.update(bal.errors(counts))
    assert history[0]["layer0"]["max_load"] == 4.0  # collapsed at the start
    first = next((i for i, h in enumerate(history) if balanced(h)), None)
    assert first is not None and first < within, f"{rule}: first balanced step {first}"
    assert balanced(bal.metrics(tail))
    for m in lm.modules():
        if hasattr(m, "balancing_biases"):
            assert m.balancing_biases[-1] == -1.0  # skip class left alone (default)
            assert m.balancing_biases.dtype == torch.float32


@pytest.mark.slow
def test_skip_share_target_is_reached():
    """skip_share=0.2: the skip class (bias -1, never chosen at first) is raised to a fifth of the tokens, the experts
    share the rest evenly (measured: 0.195-0.201 over steps 161-200)."""
    lm = tiny_model("zaya").train()
    bal = RouterBalancer(lm, RouterBalanceConfig(rule="pid", update_rate=0.01, skip_share=0.2))
    window = None
    for step in range(1, 201):
        with torch.no_grad():
            lm(batch(step))
        counts = bal.global_counts("cpu")
        window = counts if step == 161 else window + counts if window is not None else None
        bal.update(bal.errors(counts))
    for m in bal.metrics(window).values():
        assert 0.15 < m["skip_share"] < 0.25
        assert 0.8 < m["min_load"] and m["max_load"] < 1.25


def test_state_dict_round_trip_continues_bit_exactly():
    def run(steps, lm, bal):
        for step in steps:
            with torch.no_grad():
                lm(batch(step))
            bal.update(bal.errors(bal.global_counts("cpu")))

    biases = lambda lm: torch.stack([m.balancing_biases for m in lm.modules() if hasattr(m, "balancing_biases")])
    ref = skewed_zaya()
    ref_bal = RouterBalancer(ref, RouterBalanceConfig())
    run(range(1, 11), ref, ref_bal)

    first = skewed_zaya()
    bal = RouterBalancer(first, RouterBalanceConfig())
    run(range(1, 6), first, bal)
    state, module_state = bal.state_dict(), {k: v.clone() for k, v in first.state_dict().items()}
    resumed = skewed_zaya()
    resumed.load_state_dict(module_state)
    bal2 = RouterBalancer(resumed, RouterBalanceConfig())
    bal2.load_state_dict(state)
    run(range(6, 11), resumed, bal2)
    assert torch.equal(biases(resumed), biases(ref))


def test_other_moe_routers_report_load():
    lm = tiny_model("qwen3_moe").train()
    bal = RouterBalancer(lm, RouterBalanceConfig())
    with torch.no_grad():
        lm(batch())
    metrics = bal.metrics(bal.global_counts("cpu"))
    assert set(metrics) == {"layer0", "layer1"}
    assert "skip_share" not in metrics["layer0"] and metrics["layer0"]["max_load"] >= 1.0


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="router_balance.rule"):
        RouterBalanceConfig(rule="p").validate()
    with pytest.raises(ValueError, match="router_balance.skip_share"):
        RouterBalanceConfig(skip_share=1.0).validate()


class Collect:
    def __init__(self):
        self.logged = []

    def log(self, step, metrics, prefix=""):
        self.logged.append(metrics)

    def update_summary(self, summary):
        pass


def test_per_step_load_shows_balance_that_holds_only_over_the_window():
    """Each step one expert takes every token, a different one each step (what biases that move faster than a flat
    router's probabilities do): the window's shares are uniform, the per-step extremes are E and 0."""
    lm = tiny_model("zaya")
    bal = RouterBalancer(lm, RouterBalanceConfig(enabled=False))
    routers, experts = len(bal.recorder.routers), bal.biased[0].num_experts
    logger = Collect()
    for step in range(1, experts + 1):
        counts = torch.zeros(routers, experts + 1, dtype=torch.float64)
        counts[:, step - 1] = 100.0
        bal.global_counts = lambda device, c=counts: c
        bal.after_step(step, logger, log_every=experts)
    assert len(logger.logged) == 1
    metrics = logger.logged[0]
    assert metrics["max_load"] == pytest.approx(1.0) and metrics["min_load"] == pytest.approx(1.0)
    assert metrics["step_max_load"] == pytest.approx(experts) and metrics["step_min_load"] == 0.0
    assert metrics["layer0/step_max_load"] == pytest.approx(experts)


def test_follow_lr_scales_the_update_by_the_schedules_decay():
    from types import SimpleNamespace

    from ar2diff.config.schedule import ScheduleConfig
    from ar2diff.trainer.router_callback import rate_scale

    def state(step, follow, floor=0.0):
        cfg = SimpleNamespace(router_balance=RouterBalanceConfig(follow_lr=follow, follow_lr_floor=floor),
                              schedule=ScheduleConfig(name="cosine", lr=1e-3, min_lr=1e-4, warmup_fraction=0.1))
        return SimpleNamespace(cfg=cfg, step=step, budget=SimpleNamespace(steps=100))

    assert rate_scale(state(100, False)) == 1.0
    assert rate_scale(state(3, True)) == 1.0  # warmup: the rate stays whole while the load moves most
    assert rate_scale(state(100, True)) == pytest.approx(0.1)  # the last step: min_lr / lr
    assert 0.1 < rate_scale(state(50, True)) < 1.0
    assert rate_scale(state(100, True, floor=0.3)) == 0.3 and rate_scale(state(3, True, floor=0.3)) == 1.0
    assert rate_scale(state(50, True, floor=0.3)) == rate_scale(state(50, True))  # above the floor: unchanged

    lm = tiny_model("zaya")
    bal = RouterBalancer(lm, RouterBalanceConfig(rule="sign", update_rate=0.01))
    before = bal.biased[0].balancing_biases.clone()
    bal.update([torch.tensor([0.1, -0.1, 0.1, -0.1], dtype=torch.float64)] * len(bal.biased), rate_scale=0.5)
    delta = bal.biased[0].balancing_biases - before
    assert delta[:4].tolist() == pytest.approx([0.005, -0.005, 0.005, -0.005])
