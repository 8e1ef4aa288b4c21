"""DeepSpeed checkpoints: exact resume, crash safety (half-written saves are never picked up), pruning, RNG."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ar2diff.checkpoint import resume
from ar2diff.checkpoint.resume import (MARKER_NAME, capture_rng_state, find_latest_complete, load_checkpoint,
                                       resolve_checkpoint, restore_rng_state, save_checkpoint)

_spec = importlib.util.spec_from_file_location("ckpt_worker", Path(__file__).with_name("ckpt_worker.py"))
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def process_group():
    with W.one_rank_process_group():
        yield


def _engine(seed: int = 0, dropout: float = 0.0):
    return W.make_engine(W.tiny_model("llama", seed=seed, dropout=dropout), stage=1)


def test_rng_state_round_trip_covers_python_numpy_torch():
    W.seed_all(3)
    state = capture_rng_state()
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    W.seed_all(99)
    restore_rng_state(state)
    second = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])
    with pytest.raises(KeyError, match="numpy"):
        restore_rng_state({k: v for k, v in state.items() if k != "numpy"})


def test_resume_reproduces_losses_exactly(tmp_path):
    """Train 6 steps saving at 3; a fresh engine (other init, other RNG) loading step 3 repeats 4-6."""
    W.seed_all(0)
    engine = _engine(seed=0, dropout=0.1)
    W.train_steps(engine, 3)
    client = {"tokens_seen": 72, "data_position": 3, "loader": {"epoch": 0, "offsets": [1, 2]}}
    save_checkpoint(engine, tmp_path, step=3, client_state=client)
    expected = W.train_steps(engine, 3)

    W.seed_all(123)
    fresh = _engine(seed=7, dropout=0.1)
    assert load_checkpoint(fresh, tmp_path) == client
    assert fresh.lr_scheduler.last_epoch == engine.lr_scheduler.last_epoch - 3
    assert W.train_steps(fresh, 3) == expected


def test_load_without_checkpoint_is_fresh_start(tmp_path):
    assert load_checkpoint(_engine(), tmp_path / "nothing_here") is None


def test_truncated_or_corrupted_checkpoint_is_skipped(tmp_path):
    engine = _engine()
    W.train_steps(engine, 1)
    save_checkpoint(engine, tmp_path, step=1, client_state={"tokens_seen": 24})
    W.train_steps(engine, 1)
    save_checkpoint(engine, tmp_path, step=2, client_state={"tokens_seen": 48})
    assert find_latest_complete(tmp_path).step == 2
    assert (tmp_path / "latest").read_text() == "step_00000002"

    optim = next((tmp_path / "step_00000002").glob("*optim_states.pt"))
    data = optim.read_bytes()
    optim.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # same size, other bytes
    assert find_latest_complete(tmp_path).step == 2  # size check cannot see it …
    assert find_latest_complete(tmp_path, verify="hash").step == 1  # … the hash check does

    optim.write_bytes(data[: len(data) // 2])
    ref = find_latest_complete(tmp_path)
    assert (ref.step, ref.tag) == (1, "step_00000001")
    with pytest.raises(ValueError, match=f"{optim.name} has {len(data) // 2} bytes, manifest says {len(data)}"):
        resolve_checkpoint(tmp_path, "step_00000002")
    assert load_checkpoint(_engine(seed=5), tmp_path) == {"tokens_seen": 24}


@pytest.mark.e2e
def test_killed_mid_save_is_never_picked_up_and_next_save_recovers(tmp_path):
    """A process that dies right after the first file of step 2's save leaves step 1 as the latest."""
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "ckpt_worker.py"), "crash-mid-save", str(tmp_path)],
                          cwd=REPO, env=W.subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == W.CRASH_EXIT_CODE, proc.stderr[-3000:]
    partial = tmp_path / "step_00000002.partial"
    assert [p.name for p in partial.iterdir()] == ["mp_rank_00_model_states.pt"]
    assert not (tmp_path / "step_00000002").exists()
    assert find_latest_complete(tmp_path).step == 1
    assert (tmp_path / "latest").read_text() == "step_00000001"

    engine = _engine(seed=3)
    assert load_checkpoint(engine, tmp_path) == {"tokens_seen": 24, "data_position": 1}
    W.train_steps(engine, 1)
    save_checkpoint(engine, tmp_path, step=2, client_state={"tokens_seen": 48, "data_position": 2})
    assert not partial.exists()
    assert find_latest_complete(tmp_path, verify="hash").step == 2


def test_keep_last_prunes_older_and_stale_partials(tmp_path):
    engine = _engine()
    stale = tmp_path / "step_00000001.partial"
    stale.mkdir(parents=True)
    (stale / "junk.pt").write_bytes(b"x")
    for step in range(1, 5):
        save_checkpoint(engine, tmp_path, step=step, client_state={"step": step}, keep_last=2, hash_files=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == [
        "step_00000003", "step_00000004"]
    save_checkpoint(engine, tmp_path, step=5, client_state={}, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == ["step_00000005"]
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(engine, tmp_path, step=6, client_state={}, keep_last=0)


def test_resave_same_step_replaces_it(tmp_path):
    engine = _engine()
    save_checkpoint(engine, tmp_path, step=1, client_state={"v": 1})
    save_checkpoint(engine, tmp_path, step=1, client_state={"v": 2})
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == ["step_00000001"]
    assert load_checkpoint(_engine(), tmp_path) == {"v": 2}


def test_world_size_or_stage_mismatch_is_a_clear_error(tmp_path):
    engine = _engine()
    save_checkpoint(engine, tmp_path, step=1, client_state={})
    marker_path = tmp_path / "step_00000001" / MARKER_NAME
    marker = json.loads(marker_path.read_text())
    marker_path.write_text(json.dumps({**marker, "world_size": 8}))
    with pytest.raises(ValueError, match="written by 8 ranks with ZeRO stage 1; this run has 1 ranks"):
        load_checkpoint(_engine(), tmp_path)


def test_resolve_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "step_00000004.partial").mkdir()
    with pytest.raises(ValueError, match=r"no complete checkpoint under .*step_00000004\.partial"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="no completion marker"):
        resolve_checkpoint(tmp_path / "step_00000004.partial")
    with pytest.raises(ValueError, match="non-negative int"):
        resume.step_tag(-1)


def test_zero0_checkpoint_exports_the_module_weights(tmp_path):
    """Without ZeRO there are no fp32 partitions: the export takes the module from the model-states file."""
    from transformers import AutoModelForCausalLM

    from ar2diff.checkpoint.export_layout import save_run_assets
    from ar2diff.checkpoint.export import export_checkpoint

    engine = W.make_engine(W.tiny_model("llama", seed=2), stage=0)
    W.train_steps(engine, 1)
    save_run_assets(tmp_path, engine.module.config, W.tiny_tokenizer(), W.RUN_META)
    save_checkpoint(engine, tmp_path, step=1, client_state={"tokens_seen": 24})
    loaded = AutoModelForCausalLM.from_pretrained(export_checkpoint(tmp_path, tmp_path / "export"))
    trained = dict(engine.module.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in loaded.named_parameters())


@pytest.mark.dist
@pytest.mark.parametrize("stage", [1, 3])
def test_a_save_failing_on_one_rank_fails_on_every_rank_at_once_and_keeps_the_previous_checkpoint(fail_on_rank_1,
                                                                                                 stage):
    """2 gloo ranks; rank 1 alone fails step 2's save. Before: rank 0 waited in the save's barrier until the
    process-group timeout. Now every rank raises the same error naming rank 1, the partial save is removed and
    step 1 still verifies and resumes."""
    root = fail_on_rank_1 / f"stage{stage}"
    results = [json.loads((root / f"result_rank{r}.json").read_text()) for r in (0, 1)]
    partial, step1 = root / "step_00000002.partial", root / "step_00000001"
    for case in ("enospc_deepspeed", "enospc_rng"):
        [(kind, text)] = {(r[case]["raised"]["type"], r[case]["raised"]["text"]) for r in results}  # same on both
        assert kind == "DiskFull", case
        assert re.fullmatch(rf"\[Errno 28\] disk full on rank 1 while saving {re.escape(str(partial))} \([\d,]+ bytes "
                            rf"free\); the previous checkpoint {re.escape(str(step1))} is intact\. Free space .*", text)
    raised = {(r["other_deepspeed"]["raised"]["type"], r["other_deepspeed"]["raised"]["text"]) for r in results}
    assert raised == {("RuntimeError", f"saving checkpoint {partial} failed on rank 1: RuntimeError: injected write "
                                       f"failure; the previous checkpoint {step1} is intact")}
    for r in results:
        for case in ("enospc_deepspeed", "enospc_rng", "other_deepspeed"):
            assert r[case]["latest"] == 1 and not r[case]["partial"], case
        assert r["resumed"] == {"tokens_seen": 24, "data_position": 1}
        assert r["after"] == 2


RANK_JOBS = {"ckpt_fail": {}}  # for the rank_jobs fixture (tests/conftest.py)


@pytest.fixture(scope="module")
def fail_on_rank_1(rank_jobs):
    """ckpt_worker.fail_on_rank_1 on 2 gloo ranks, for ZeRO stages 1 and 3, from the session's one 2-rank launch
    (its timeout is well under the 10-minute process-group timeout that a hang would take)."""
    return rank_jobs / "ckpt_fail"
