"""The phase trainer end to end on CPU: exact resume after a kill, two ranks (ZeRO-3) vs one, exports."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tiny import env, losses, run, train_cmd


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


def router_biases(run_dir) -> dict[str, torch.Tensor]:
    """ZAYA's exported router balancing biases (fp32 whatever the export dtype)."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(run_dir) / "export" / "model.safetensors"))
    return {k: v for k, v in weights.items() if k.endswith("balancing_biases")}


@pytest.mark.e2e
def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path, cache):
    budget = ["budget.tokens=5120", "trainer.ckpt_every=4"]  # 20 steps
    run(train_cmd(tmp_path / "ref", cache, *budget))
    reference = losses(tmp_path / "ref")
    assert len(reference) == 20

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(killed, cache, *budget), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step_00000008").is_dir():
        assert proc.poll() is None and time.time() < deadline, "training ended before the kill"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "export").exists()

    run(train_cmd(killed, cache, *budget))  # the same command resumes from the newest complete checkpoint
    assert losses(killed) == reference  # bit-exact: data position, draft masks, optimizer, RNG
    ref_biases, resumed_biases = router_biases(tmp_path / "ref"), router_biases(killed)
    assert ref_biases.keys() == resumed_biases.keys() and ref_biases  # ZAYA: router bias balancing resumes bit-exact
    for k, v in ref_biases.items():
        assert v.dtype == torch.float32 and torch.equal(resumed_biases[k], v), k
        assert v[-1] == -1.0 and not torch.equal(v[:-1], torch.zeros_like(v[:-1]))  # experts moved, skip kept
    summary = json.loads((killed / "summary.json").read_text())
    assert set(summary["router_load"]) == {"layer0", "layer1"}  # load of the biased top-1 choices, per layer
    assert {"max_load", "min_load", "load_ratio", "load_entropy", "skip_share"} <= set(summary["router_load"]["layer1"])
    router_rows = [h for h in json.loads((tmp_path / "ref" / "summary.json").read_text())["history"]
                   if "train/loss" not in h]
    assert [h["step"] for h in router_rows] == list(range(1, 21))  # a router row per logged step
    assert [h for h in summary["history"] if "train/loss" not in h] == router_rows  # resumed: the same numbers
    export = json.loads((killed / "export" / "ar2diff.json").read_text())
    assert export["step"] == 20 and export["tokens_seen"] == 5120 and export["phase"] == "tidar_midtrain"


RANKS_BUDGET = ["budget.tokens=1536", "trainer.ckpt_every=100"]  # 6 steps


@pytest.fixture(scope="module")
def zero_sweeps(tmp_path_factory, cache) -> Path:
    """ZeRO-2 and ZeRO-3 on 1 rank (micro 2 x accumulation 2) and on 2 ranks (micro 2 x 1): one Hydra sweep per world
    size, so 2 launches instead of 4 (a job of a sweep logs and exports exactly what its own launch does)."""
    root = tmp_path_factory.mktemp("zero")
    for name, ranks in (("one", 1), ("two", 2)):
        run(train_cmd(root / name, cache, *RANKS_BUDGET, "deepspeed.zero_stage=2,3", ranks=ranks, multirun=True))
    return root


@pytest.mark.dist
@pytest.mark.parametrize("setting", [
    ["deepspeed.zero_stage=2"],
    ["deepspeed.zero_stage=3"],
    # AutoEP expert parallelism (2 ranks hold 2 experts each) on Qwen3-MoE, router balancing loss included
    ["model=tiny_qwen3_moe", "deepspeed.zero_stage=2", "deepspeed.expert_parallel_size=2"],
], ids=["zero2", "zero3", "autoep2_zero2"])
def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path, cache, setting, request):
    if len(setting) == 1:  # a ZeRO stage: its job of the module's two sweeps
        sweeps = request.getfixturevalue("zero_sweeps")
        one_dir, two_dir = sweeps / "one" / setting[0], sweeps / "two" / setting[0]
    else:
        budget = [*RANKS_BUDGET, *setting]
        one_rank = [o for o in budget if not o.startswith("deepspeed.expert_parallel_size")]
        one_dir, two_dir = tmp_path / "one", tmp_path / "two"
        run(train_cmd(one_dir, cache, *one_rank))  # 1 rank: micro 2 x accumulation 2, no expert parallel
        run(train_cmd(two_dir, cache, *budget, ranks=2))  # 2 ranks: micro 2 x 1
    one, two = losses(one_dir), losses(two_dir)
    assert [s for s, *_ in one] == [s for s, *_ in two] == list(range(1, 7))
    torch.testing.assert_close(torch.tensor([v[1:] for v in two]), torch.tensor([v[1:] for v in one]),
                               rtol=1e-4, atol=1e-5)
    assert one[-1][1] < one[0][1]  # it learns
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(one_dir / "export")
    b = AutoModelForCausalLM.from_pretrained(two_dir / "export")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(pa, pb, rtol=1e-3, atol=1e-5, msg=name)
    one_b, two_b = router_biases(one_dir), router_biases(two_dir)
    assert one_b.keys() == two_b.keys()  # ZAYA: counts summed over ranks give the same bias updates (ZeRO-3 too)
    for k, v in one_b.items():
        torch.testing.assert_close(two_b[k], v, rtol=0, atol=1e-6, msg=k)


@pytest.mark.e2e
def test_multirun_sweep_gives_one_folder_per_job(tmp_path, cache):
    run_dir = tmp_path / "sweep"
    cmd = train_cmd(run_dir, cache, "budget.tokens=512", "trainer.ckpt_every=100")
    run([*cmd[:3], "--multirun", *cmd[3:], "objective.alpha=0.5,2.0"])
    assert (run_dir / "multirun.yaml").is_file()  # Hydra's sweep record next to the job folders
    for job, alpha in (("objective.alpha=0.5", 0.5), ("objective.alpha=2.0", 2.0)):
        assert OmegaConf.load(run_dir / job / "config.yaml").objective.alpha == alpha
        summary = json.loads((run_dir / job / "summary.json").read_text())
        (row,) = [h for h in summary["history"] if h["step"] == 2 and "train/loss" in h]
        expected = (alpha * row["train/loss_ar"] + row["train/loss_diff"]) / (1 + alpha)
        assert row["train/loss"] == pytest.approx(expected, rel=1e-5)
