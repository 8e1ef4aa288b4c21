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
from contextlib import contextmanager

import pytest

from ar2diff.checkpoint.resume import find_latest_complete
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


def test_resume_with_a_changed_budget_is_refused_listing_the_difference(tmp_path, cache, reference_dir):
    shutil.copytree(reference_dir, tmp_path, dirs_exist_ok=True)  # a finished run of BUDGET (2560 tokens, 10 steps)
    changed = [o for o in BUDGET if not o.startswith("budget.tokens=")] + ["budget.tokens=3072"]
    proc = subprocess.run(train_cmd(tmp_path, cache, *changed), env=env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    [line] = error_lines(proc)
    assert "budget.tokens: 2560 -> 3072" in line and "trainer.allow_config_change=true" in line
    run(train_cmd(tmp_path, cache, *changed, "trainer.allow_config_change=true"))
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 12


PROGRESS = re.compile(r"%\||examples/s|\d+ examples \[")  # tqdm and `datasets` progress bars


def quiet_stderr(proc) -> list[str]:
    """stderr without the progress bars and the data-preparation INFO lines: what is left must be the error."""
    return [line for line in proc.stderr.splitlines()
            if line.strip() and not line.startswith("INFO ") and not PROGRESS.search(line)]


def test_disk_full_during_save_keeps_the_previous_checkpoint_and_says_so_in_one_line(small_disk, cache):

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
    if sig == signal.SIGTERM:  # the same handler either way: one re-run shows the stopped set-up left nothing behind
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
def test_a_signal_to_both_ranks_while_rank_0_tokenizes_exits_0_on_each(tmp_path):
    """Rank 0 tokenizes the whole library into a fresh cache while rank 1 waits for it; SIGTERM to each rank (what a
    scheduler sends): both exit 0 within seconds with the set-up line, nothing half-written. (The wait
    group was once created beside rank 0's work: rank 1 then sat in a store wait that neither the signal nor rank
    0's exit ended.)"""
    cache, run_dir = tmp_path / "fresh-cache", tmp_path / "run"
    cmd = train_cmd(run_dir, cache, *BUDGET, "data.sources.0.path=*", ranks=2)
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while not list(cache.glob("**/tokenizer/bpe-*/tokenizer.json")):  # the BPE is done: tokenization starts
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        time.sleep(2.0)  # rank 0 tokenizes (several seconds here); rank 1 waits at the barrier
        ranks = [rank_pid(proc.pid, r) for r in (0, 1)]
        assert None not in ranks, "a rank had already exited"
        for pid in ranks:
            os.kill(pid, signal.SIGTERM)
        signalled = time.time()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0 and time.time() - signalled < 60, err[-3000:]  # torchrun: every rank exited 0
    assert err.count("stopped by SIGTERM during set-up") == 2 and "Traceback" not in err, err[-3000:]
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").glob("step_*"))
    assert [p for p in tmp_path.rglob("*") if ".tmp" in p.name] == []  # (the re-run after a set-up stop: above)


@contextmanager
def two_ranks_past_step(tmp_path, cache, step: int = 3):
    """A 2-rank torchrun training run in its own session, yielded as (process, its stderr file) once rank 0 has
    logged `step`; waited for at the end (killed, with its ranks, if still running)."""
    out_path, err_path = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(train_cmd(tmp_path / "run", cache, "budget.tokens=40960", "trainer.ckpt_every=1000",
                                          ranks=2), env=env(), stdout=out, stderr=err, text=True,
                                start_new_session=True)
    try:
        deadline = time.time() + 240
        while f"[train step {step}]" not in out_path.read_text():
            assert proc.poll() is None and time.time() < deadline, err_path.read_text()[-3000:]
            time.sleep(0.05)
        yield proc, err_path
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.dist
def test_a_stop_sent_to_every_process_of_the_job_is_one_stop_not_a_kill(tmp_path, cache):
    """A scheduler's SIGTERM reaches torchrun and each rank, and torchrun forwards its own copy to each rank: the
    ranks get it twice within milliseconds. That repeat is the same stop (not the second signal that exits at once),
    so the ranks still checkpoint the step they stop at and say "stopped" (once, it killed them with 143 and the
    steps since the last periodic checkpoint were lost)."""
    run_dir = tmp_path / "run"
    with two_ranks_past_step(tmp_path, cache) as (proc, err_path):
        for pid in [proc.pid, rank_pid(proc.pid, 0), rank_pid(proc.pid, 1)]:
            os.kill(pid, signal.SIGTERM)
    err = err_path.read_text()
    stopped = [int(m) for m in re.findall(r"stopped by SIGTERM at step (\d+); checkpoint saved", err)]
    assert len(stopped) == 2 and stopped[0] == stopped[1] >= 3, err[-3000:]
    assert "Killed" not in err and "exitcode  : 143" not in err
    assert find_latest_complete(run_dir / "checkpoints", verify="hash").step == stopped[0]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "stopped"


@pytest.mark.dist
def test_a_hung_peer_fails_the_run_after_the_collective_timeout_with_a_message(tmp_path, cache):
    """SIGSTOP on rank 1 mid-training: rank 0 gives up after trainer.collective_timeout_minutes (here 6 s, stated at
    start-up) and says what happened, instead of waiting DeepSpeed's silent 10 minutes."""
    run_dir, out_path, err_path = tmp_path / "run", tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(train_cmd(run_dir, cache, "budget.tokens=20480", "trainer.ckpt_every=2",
                                          "trainer.collective_timeout_minutes=0.1", ranks=2),
                                env=env(), stdout=out, stderr=err, text=True)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "step_00000002").is_dir():
        assert proc.poll() is None and time.time() < deadline, err_path.read_text()[-3000:]
        time.sleep(0.05)
    victim = rank_pid(proc.pid, 1)
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.time()
    try:  # once rank 0 has said it, the stopped rank is killed: torchrun's SIGTERM cannot reach a stopped process,
        # and it would wait its 30 s shutdown timeout before its own SIGKILL
        while "ar2diff.train: error" not in err_path.read_text() and time.time() - stopped_at < 90:
            time.sleep(0.1)
        waited = time.time() - stopped_at
    finally:
        if os.path.exists(f"/proc/{victim}"):  # torchrun may have killed it already
            os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=120)
    err = err_path.read_text()
    assert proc.returncode != 0 and waited < 90, (waited, err[-3000:])
    assert "a collective waits 0.1 min for a peer (trainer.collective_timeout_minutes)" in out_path.read_text()
    lines = [line for line in err.splitlines() if "ar2diff.train: error" in line]
    assert any("rank 0: a collective waited trainer.collective_timeout_minutes=0.1 min for peer rank 1, which never "
               "answered" in line for line in lines), err[-3000:]


@pytest.mark.dist
def test_a_peer_killed_mid_step_is_named_by_the_survivor_not_taken_for_a_stop(tmp_path, cache):
    """SIGKILL on rank 1 mid-training: rank 0's collective breaks and torchrun then sends it SIGTERM. Rank 0 says, in
    one line, that it lost peer rank 1, which ended without a word (a rank that ends on purpose leaves one in the
    rendezvous store), instead of "stopped by SIGTERM ... re-run to resume" or gloo's traceback."""
    with two_ranks_past_step(tmp_path, cache) as (proc, err_path):
        os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    err = err_path.read_text()
    lines = [line for line in err.splitlines() if "ar2diff.train: error" in line]
    assert proc.returncode != 0 and len(lines) == 1, err[-3000:]
    assert "rank 0: a collective lost peer rank 1 (it ended without a word: killed" in lines[0], lines
    assert "stopped by" not in err and "[rank0]: Traceback" not in err


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
