"""LR schedules against hand-computed values, and the LambdaLR built from them."""

import math

import pytest
import torch

from ar2diff.trainer.schedule import (ScheduleConfig, build_lr_scheduler, decay_steps, lr_at, lr_multiplier,
                                      warmup_steps)


def lrs(cfg: ScheduleConfig, total: int) -> list[float]:
    return [lr_at(step, cfg, total) for step in range(total)]


def test_cosine_by_hand():
    # total 11, warmup 2: warmup lrs lr/2, lr; cosine over steps 2..10, progress (s - 2) / 8.
    cfg = ScheduleConfig(name="cosine", lr=1e-5, min_lr=3e-6, warmup_steps=2)
    got = lrs(cfg, 11)
    assert got[0] == pytest.approx(5e-6, rel=1e-12)
    assert got[1] == pytest.approx(1e-5, rel=1e-12)
    assert got[2] == pytest.approx(1e-5, rel=1e-12)
    # progress 0.25: 3e-6 + 7e-6 * 0.5 * (1 + cos(pi / 4)) = 8.974873734e-6
    assert got[4] == pytest.approx(8.974873734152917e-6, rel=1e-12)
    assert got[6] == pytest.approx(6.5e-6, rel=1e-12)  # progress 0.5: midpoint of 1e-5 and 3e-6
    assert got[10] == pytest.approx(3e-6, rel=1e-12)  # last step lands on min_lr
    assert all(a >= b for a, b in zip(got[2:], got[3:]))  # monotone after warmup


def test_tidar_recipe_one_percent_warmup():
    # TiDAR: 1e-5 -> 3e-6, 1% warmup; over 1000 steps that is 10 warmup steps.
    cfg = ScheduleConfig(name="cosine", lr=1e-5, min_lr=3e-6, warmup_fraction=0.01)
    assert warmup_steps(cfg, 1000) == 10
    assert lr_at(0, cfg, 1000) == pytest.approx(1e-6, rel=1e-12)
    assert lr_at(9, cfg, 1000) == pytest.approx(1e-5, rel=1e-12)
    assert lr_at(999, cfg, 1000) == pytest.approx(3e-6, rel=1e-12)
    assert lr_at(5000, cfg, 1000) == pytest.approx(3e-6, rel=1e-12)  # past the end: stays at min_lr


@pytest.mark.parametrize("shape, decay_values", [
    ("linear", [0.75, 0.5, 0.25, 0.0]),
    ("cosine", [0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 - math.cos(math.pi / 4)), 0.0]),
    ("1-sqrt", [0.5, 1 - math.sqrt(0.5), 1 - math.sqrt(0.75), 0.0]),
])
def test_wsd_by_hand(shape, decay_values):
    # total 10, warmup 2, decay 40% = 4 steps (6..9): progress 1/4, 2/4, 3/4, 1.
    cfg = ScheduleConfig(name="wsd", lr=1.0, min_lr=0.0, warmup_steps=2, decay_fraction=0.4, decay_shape=shape)
    assert decay_steps(cfg, 10) == 4
    assert lrs(cfg, 10) == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0] + decay_values, abs=1e-12)


def test_wsd_decays_to_min_lr():
    cfg = ScheduleConfig(name="wsd", lr=4.0, min_lr=1.0, warmup_steps=0, decay_fraction=0.5)
    assert lrs(cfg, 4) == pytest.approx([4.0, 4.0, 2.5, 1.0], abs=1e-12)


def test_constant_with_warmup():
    cfg = ScheduleConfig(name="constant", lr=2.0, min_lr=0.0, warmup_steps=4)
    assert lrs(cfg, 6) == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0], abs=1e-12)


def test_no_warmup_starts_at_peak():
    cfg = ScheduleConfig(name="cosine", lr=1.0, min_lr=0.0, warmup_fraction=0.0)
    assert lrs(cfg, 3) == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)


def test_warmup_steps_override_fraction():
    cfg = ScheduleConfig(warmup_fraction=0.5, warmup_steps=3)
    assert warmup_steps(cfg, 100) == 3


def test_lambda_lr_follows_lr_at():
    cfg = ScheduleConfig(name="wsd", lr=0.1, min_lr=0.01, warmup_steps=2, decay_fraction=0.5, decay_shape="cosine")
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=cfg.lr)
    scheduler = build_lr_scheduler(optimizer, cfg, total_steps=8)
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx(lrs(cfg, 8), rel=1e-12)
    assert lr_multiplier(cfg, 8)(7) == pytest.approx(0.1, rel=1e-12)  # min_lr / lr
    assert scheduler.state_dict()["lr_lambdas"] == [None]  # plain function: the schedule is not checkpointed


def test_scheduler_rejects_optimizer_with_other_lr():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    with pytest.raises(ValueError, match="schedule.lr"):
        build_lr_scheduler(optimizer, ScheduleConfig(lr=0.1, min_lr=0.0), total_steps=4)


@pytest.mark.parametrize("changes, key", [
    ({"name": "linear"}, "schedule.name"),
    ({"lr": 0.0}, "schedule.lr"),
    ({"min_lr": 1.0}, "schedule.min_lr"),
    ({"warmup_fraction": 1.0}, "schedule.warmup_fraction"),
    ({"warmup_steps": -1}, "schedule.warmup_steps"),
    ({"decay_shape": "exp"}, "schedule.decay_shape"),
    ({"name": "wsd", "decay_fraction": 0.0}, "schedule.decay_fraction"),
])
def test_validate_names_the_key(changes, key):
    cfg = ScheduleConfig(**{"lr": 1e-5, "min_lr": 3e-6, **changes})
    with pytest.raises(ValueError, match=key):
        cfg.validate()


def test_validate_against_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        ScheduleConfig(name="wsd", warmup_steps=8, decay_fraction=0.5).validate(total_steps=10)
    with pytest.raises(ValueError, match="total_steps=0"):
        ScheduleConfig().validate(total_steps=0)
    ScheduleConfig(name="wsd", warmup_steps=5, decay_fraction=0.5).validate(total_steps=10)
