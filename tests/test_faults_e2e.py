"""Faults injected into real `python -m ar2diff.train` runs on CPU: preemption, a corrupted newest checkpoint, a NaN,
a locked run folder, a changed config on resume, and a full disk."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tiny import env, losses, run, train_cmd

pytestmark = pytest.mark.e2e
BUDGET = ["budget.tokens=2560", "trainer.ckpt_every=4"]  # 10 steps, checkpoints at 4, 8 and 10


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory, cache):
    """The uninterrupted run's folder (do not modify: copy it)."""
    run_dir = tmp_path_factory.mktemp("reference")
    run(train_cmd(run_dir, cache, *BUDGET))
    return run_dir


@pytest.fixture(scope="module")
def reference(reference_dir):
    return losses(reference_dir)


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "error:" in line]


def test_sigterm_mid_phase_checkpoints_exits_0_and_the_rerun_matches(tmp_path, cache, reference):
    proc = subprocess.Popen(train_cmd(tmp_path, cache, *BUDGET), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (tmp_path / "checkpoints" / "step_00000004").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM at step" in err
    stopped = int(err.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert 4 <= stopped < 10 and (tmp_path / "checkpoints" / f"step_{stopped:08d}").is_dir()
    assert not (tmp_path / "export").exists()

    run(train_cmd(tmp_path, cache, *BUDGET))  # the same command resumes
    assert losses(tmp_path) == reference


def test_corrupted_newest_checkpoint_falls_back_and_matches_the_uninterrupted_run(tmp_path, cache, reference,
                                                                                   reference_dir):
    # a finished run of BUDGET: a copy of the uninterrupted run (the same command would write the same files; the
    # run folder's path is not part of the resume check)
    shutil.copytree(reference_dir, tmp_path, dirs_exist_ok=True)
    newest = tmp_path / "checkpoints" / "step_00000010"
    optim = next(newest.glob("*optim_states.pt"))
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # in place, same size: only the sha256 can tell
    optim.write_bytes(bytes(data))
    (tmp_path / "summary.json").unlink()

    proc = run(train_cmd(tmp_path, cache, *BUDGET))
    assert f"checkpoint {newest} is corrupted: {optim}" in proc.stderr
    assert "resumed from step 8" in proc.stdout
    assert losses(tmp_path) == reference


def test_injected_nan_stops_the_run_naming_the_step(tmp_path, cache):
    proc = subprocess.run(train_cmd(tmp_path, cache, "budget.tokens=1280", "schedule.lr=1e6", "schedule.min_lr=0"),
                          env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    [line] = error_lines(proc)
    assert "non-finite training step" in line and "data position epoch=" in line and "loss=nan" in line
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "export").exists()


def test_second_job_on_a_locked_run_folder_is_refused(tmp_path, cache):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom ar2diff.trainer.run_lock import RunLock\n"
         "RunLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(300)\n", str(tmp_path)],
        env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = subprocess.run(train_cmd(tmp_path, cache, *BUDGET), env=env(), capture_output=True, text=True,
                              timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1
    [line] = error_lines(proc)
    assert f"in use by pid {holder.pid}" in line
    assert not (tmp_path / "checkpoints").exists()


def test_resume_with_a_changed_budget_is_refused_listing_the_difference(tmp_path, cache):
    run(train_cmd(tmp_path, cache, "budget.tokens=512", "trainer.ckpt_every=4"))
    proc = subprocess.run(train_cmd(tmp_path, cache, "budget.tokens=1024", "trainer.ckpt_every=4"), env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    [line] = error_lines(proc)
    assert "budget.tokens: 512 -> 1024" in line and "trainer.allow_config_change=true" in line
    run(train_cmd(tmp_path, cache, "budget.tokens=1024", "trainer.ckpt_every=4", "trainer.allow_config_change=true"))
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 4


PROGRESS = re.compile(r"%\||examples/s|\d+ examples \[")  # tqdm and `datasets` progress bars


def quiet_stderr(proc) -> list[str]:
    """stderr without the progress bars and the data-preparation INFO lines: what is left must be the error."""
    return [line for line in proc.stderr.splitlines()
            if line.strip() and not line.startswith("INFO ") and not PROGRESS.search(line)]


def test_disk_full_during_save_keeps_the_previous_checkpoint_and_says_so_in_one_line(small_disk, cache):
    from ar2diff.checkpoint.resume import find_latest_complete

    run_dir = small_disk / "run"  # each checkpoint of the tiny model is ~3.6 MB: the second one does not fit
    proc = subprocess.run(train_cmd(run_dir, cache, "budget.tokens=2048", "trainer.ckpt_every=2",
                                    "logger=wandb_offline"),  # W&B on, its files on the same small disk
                          env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    [line] = quiet_stderr(proc)  # the disk-full line and nothing else: no W&B error, no "Logging error", no traceback
    assert line.startswith("ar2diff.train: error: disk full while saving") and "step_00000002 is intact" in line
    assert (run_dir / "wandb").is_dir()
    assert find_latest_complete(run_dir / "checkpoints", verify="hash").step == 2
    assert not list((run_dir / "checkpoints").glob("*.partial"))


def test_a_disk_filled_by_another_writer_while_wandb_runs_gives_one_line(small_disk, cache):
    """Before: every W&B log record printed a ~40-line "--- Logging error ---" block, then a raw OSError traceback."""
    run_dir = small_disk / "run"
    debug_log = run_dir / "wandb" / "latest-run" / "logs" / "debug.log"
    proc = subprocess.Popen(train_cmd(run_dir, cache, "budget.tokens=1024", "trainer.ckpt_every=2",
                                      "logger=wandb_offline"), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not debug_log.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    with open(small_disk / "filler", "wb", buffering=0) as filler:  # fill the disk and keep it full until the run ends
        while proc.poll() is None:
            try:
                filler.write(bytes(1 << 12))
            except OSError:
                time.sleep(0.02)
    out, err = proc.communicate(timeout=60)
    proc.stderr = err
    assert proc.returncode == 1, err[-3000:]
    [line] = quiet_stderr(proc)
    assert line.startswith(f"ar2diff.train: error: disk full while writing under {run_dir}"), line


@pytest.mark.dist
def test_disk_full_under_torchrun_is_one_line_from_rank_0_and_no_rank_waits(small_disk, cache):
    """Two ranks share the small disk: the save fails on one or both; both stop at once (not after the process-group
    timeout) and the user reads one line, from rank 0, naming the failed rank(s)."""
    from ar2diff.checkpoint.resume import find_latest_complete

    run_dir = small_disk / "run"
    started = time.time()
    proc = subprocess.run(train_cmd(run_dir, cache, "budget.tokens=2048", "trainer.ckpt_every=2",
                                    "logger=wandb_offline", ranks=2), env=env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode != 0 and time.time() - started < 180, proc.stderr[-3000:]
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "ar2diff.train: error:" in line]
    assert len(ours) == 1 and re.search(r"error: disk full on rank [01](, 1)? while saving .*step_00000004\.partial",
                                        ours[0]), ours
    assert "step_00000002 is intact" in ours[0]
    assert "--- Logging error ---" not in proc.stderr and "[rank0]:" not in proc.stderr
    assert find_latest_complete(run_dir / "checkpoints", verify="hash").step == 2
    assert not list((run_dir / "checkpoints").glob("*.partial"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_set_up_exits_0_with_nothing_half_written(tmp_path, sig, reference):
    """From process start: a signal before the first step (composition, BPE training into a fresh cache,
    tokenization, model build) exits 0 without a traceback; the same command then trains as if never stopped."""
    cache = tmp_path / "fresh-cache"  # set-up has real work to do: train the BPE, tokenize
    proc = subprocess.Popen(train_cmd(tmp_path / "run", cache, *BUDGET), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "overrides.yaml").is_file():  # written as the run starts, before set-up
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and f"stopped by {signal.Signals(sig).name} during set-up" in err
    assert not any((tmp_path / "run" / "checkpoints").glob("step_*"))
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp" in p.name or p.name.startswith("tmp")]
    assert leftovers == []
    run(train_cmd(tmp_path / "run", cache, *BUDGET))
    assert losses(tmp_path / "run") == reference


def rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the worker with RANK=`rank` among the launcher's children (torchrun), if it runs yet."""
    from pathlib import Path

    pids = []
    for children in Path(f"/proc/{launcher_pid}/task").glob("*/children"):  # a child may belong to any thread
        try:
            pids += children.read_text().split()
        except OSError:
            continue
    for pid in pids:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.dist
def test_a_hung_peer_fails_the_run_after_the_collective_timeout_with_a_message(tmp_path, cache):
    """SIGSTOP on rank 1 mid-training: rank 0 gives up after trainer.collective_timeout_minutes (here 6 s, stated at
    start-up) and says what happened, instead of waiting DeepSpeed's silent 10 minutes."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(run_dir, cache, "budget.tokens=20480", "trainer.ckpt_every=2",
                                      "trainer.collective_timeout_minutes=0.1", ranks=2),
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "step_00000002").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    victim = rank_pid(proc.pid, 1)
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        if os.path.exists(f"/proc/{victim}"):
            os.kill(victim, signal.SIGKILL)
    waited = time.time() - stopped_at
    assert proc.returncode != 0 and waited < 90, (waited, err[-3000:])
    assert "a collective waits 0.1 min for a peer (trainer.collective_timeout_minutes)" in out
    lines = [line for line in err.splitlines() if "ar2diff.train: error" in line]
    assert any("rank 0: a collective waited trainer.collective_timeout_minutes=0.1 min for a peer rank that never "
               "answered" in line for line in lines), err[-3000:]


@pytest.mark.dist
def test_rank_0_alone_may_take_longer_than_the_collective_timeout(tmp_path):
    """A healthy 2-rank run whose rank-0 sections (BPE training and tokenization into a fresh cache, the export, the
    phase-end decoder check) each take longer than a 6 s collective timeout: the other rank waits on the separate
    trainer.rank0_timeout_minutes, and the run completes."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(train_cmd(run_dir, tmp_path / "fresh-cache", "budget.tokens=1024",
                                    "trainer.collective_timeout_minutes=0.1", "decoder.enabled=true",
                                    "data.heldout_fraction=0.4", "decoder.num_prompts=8", "decoder.prompt_len=8",
                                    "decoder.max_new_tokens=64", "decoder.quality.enabled=false", ranks=2),
                          env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["eval_seconds"] > 6  # the decoder check alone outlasted the collective timeout
