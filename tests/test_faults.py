"""Loop-level faults as plain objects: the non-finite guard, the preemption signal, the run-folder lock and the
resume config check (each injected here; the end-to-end runs are in test_faults_e2e.py)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ar2diff.trainer import run_lock
from ar2diff.trainer.faults import NonFiniteError, NonFiniteGuard, StopRequested, StopSignal
from ar2diff.trainer.resume_config import ConfigChanged, check_resume_config, config_differences
from ar2diff.trainer.run_lock import LOCK_NAME, RunLock, RunLocked

POS = {"epoch": 1, "step": 7}


def test_guard_stops_on_nan_loss_naming_step_position_and_terms():
    guard = NonFiniteGuard(max_skips=0)
    assert guard.check(3, {"loss": 1.0, "loss_ar": 1.0}, 2.0, True, POS)
    with pytest.raises(NonFiniteError, match=r"step 5 \(data position epoch=1 step=7\): loss=nan, loss_ar=1"):
        guard.check(5, {"loss": float("nan"), "loss_ar": 1.0}, 2.0, False, POS)


def test_guard_skips_a_bounded_number_of_dropped_steps_then_stops():
    guard = NonFiniteGuard(max_skips=2)
    assert guard.check(1, {"loss": 1.0}, float("inf"), False, POS) is False
    assert guard.check(2, {"loss": float("inf")}, None, False, POS) is False
    assert guard.skipped == [1, 2]
    with pytest.raises(NonFiniteError, match="2 such step"):
        guard.check(3, {"loss": float("nan")}, float("nan"), False, POS)


def test_guard_never_skips_a_step_the_optimizer_applied():
    with pytest.raises(NonFiniteError, match="optimizer applied it"):
        NonFiniteGuard(max_skips=5).check(4, {"loss": 2.0}, float("nan"), True, POS)


def test_first_signal_sets_the_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignal() as stop:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.should_stop() and stop.name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_an_interruptible_section_is_abandoned_at_once_and_the_rest_only_flags():
    stop = StopSignal()
    with stop:
        with pytest.raises(StopRequested, match="stopped by SIGUSR1"):
            with stop.interruptible():
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(5)  # the handler raises inside the sleep: never reached to its end
                raise AssertionError("not abandoned")
        assert stop.received == signal.SIGUSR1
        with pytest.raises(StopRequested):  # a signal that came before the section: it is not started
            with stop.interruptible():
                raise AssertionError("entered after a stop")


def test_nested_installs_keep_the_handlers_until_the_outermost_exit_and_a_fresh_install_forgets():
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopSignal()
    with stop:  # the command line, from process start
        os.kill(os.getpid(), signal.SIGUSR1)  # during composition: the flag stays for the trainer to read
        with stop:  # the trainer
            assert stop.should_stop()
        assert signal.getsignal(signal.SIGUSR1) == stop._handle  # still ours
    assert signal.getsignal(signal.SIGUSR1) is before
    with stop:  # a later, unrelated use in the same process starts clean
        assert not stop.should_stop()


SECOND_SIGNAL = ("import os, signal, sys, time\nfrom ar2diff.trainer.faults import StopSignal\n"
                 "first, second, pause = signal.Signals[sys.argv[1]], signal.Signals[sys.argv[2]], float(sys.argv[3])\n"
                 "with StopSignal(forward_window_s=0.5) as stop:\n    os.kill(os.getpid(), first)\n"
                 "    print('first', flush=True)\n    time.sleep(pause)\n    os.kill(os.getpid(), second)\n"
                 "    time.sleep(1)\n    print('still stopping', stop.name, flush=True)\n")


@pytest.mark.e2e
@pytest.mark.parametrize("second,pause,killed", [("SIGTERM", 0.8, True), ("SIGINT", 0.0, True),
                                                   ("SIGTERM", 0.0, False)])
def test_a_second_signal_exits_at_once_but_a_forwarded_copy_of_the_first_does_not(second, pause, killed):
    """A second request (a later repeat, or another signal) ends the process at once; the same signal again within
    the forward window is one stop reaching the rank twice (scheduler and launcher both send it) and is ignored."""
    proc = subprocess.run([sys.executable, "-c", SECOND_SIGNAL, "SIGTERM", second, str(pause)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert "first" in proc.stdout
    if killed:
        assert proc.returncode == 128 + signal.Signals[second] and "still stopping" not in proc.stdout
    else:
        assert proc.returncode == 0 and "still stopping SIGTERM" in proc.stdout, proc.stderr


HOLDER = ("import sys, time\nfrom ar2diff.trainer.run_lock import RunLock\n"
          "RunLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(120)\n")


def _holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.e2e
def test_second_job_on_a_locked_run_folder_is_refused_and_a_killed_owner_is_stale(tmp_path, caplog):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunLocked, match=f"in use by pid {proc.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()  # SIGKILL: the lock file stays behind
        proc.wait()
    assert (tmp_path / LOCK_NAME).is_file()
    with caplog.at_level(logging.WARNING), RunLock(tmp_path):
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid()
    assert "stale lock" in caplog.text
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.e2e
def test_without_fcntl_a_dead_pid_or_another_boot_is_stale_and_another_host_is_not(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "fcntl", None)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = run_lock._identity()
    assert not run_lock.owner_alive({**me, "pid": dead.pid}, None)
    assert not run_lock.owner_alive({**me, "pid": os.getppid(), "boot_id": "another-boot"}, None)
    assert run_lock.owner_alive({**me, "pid": os.getppid()}, None)
    assert run_lock.owner_alive({**me, "host": "elsewhere"}, None)  # cannot probe another host's pid
    assert not run_lock.owner_alive({**me, "host": "elsewhere"}, True)  # but its fcntl lock is free
    (tmp_path / LOCK_NAME).write_text(json.dumps({**me, "host": "elsewhere"}))
    with pytest.raises(RunLocked, match="on elsewhere"):
        RunLock(tmp_path).acquire()


SAVED = {"seed": 0, "budget": {"tokens": 5120, "global_batch_size": 4}, "schedule": {"lr": 1e-3},
         "data": {"sources": [{"path": "a.jsonl"}], "cache_dir": "/c"}, "trainer": {"log_every": 1},
         "logger": {"wandb": False}}


def _changed(**edits):
    cfg = json.loads(json.dumps(SAVED))
    for dotted, value in edits.items():
        node, *path = dotted.split("__")
        target = cfg[node]
        for key in path[:-1]:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[path[-1] if not isinstance(target, list) else int(path[-1])] = value
    return cfg


def test_config_differences_list_training_keys_and_ignore_harmless_ones():
    assert config_differences(SAVED, _changed(trainer__log_every=5, logger__wandb=True, data__cache_dir="/d")) == []
    assert config_differences(SAVED, _changed(budget__tokens=9999, data__sources__0__path="b.jsonl")) == [
        "budget.tokens: 5120 -> 9999", 'data.sources.0.path: "a.jsonl" -> "b.jsonl"']


def test_resume_with_changed_schedule_is_refused_unless_allowed(tmp_path):
    assert check_resume_config(tmp_path, SAVED, resuming=False, allow_change=False) == []
    assert json.loads((tmp_path / "resolved_config.json").read_text()) == SAVED
    changed = _changed(budget__tokens=9999, schedule__lr=1.0)
    with pytest.raises(ConfigChanged, match=r"budget.tokens: 5120 -> 9999; schedule.lr: 0.001 -> 1.0"):
        check_resume_config(tmp_path, changed, resuming=True, allow_change=False)
    assert check_resume_config(tmp_path, changed, resuming=True, allow_change=True) == [
        "budget.tokens: 5120 -> 9999", "schedule.lr: 0.001 -> 1.0"]
    assert json.loads((tmp_path / "resolved_config.json").read_text())["budget"]["tokens"] == 9999


def _stop_worker(rank: int, port: int, out: str) -> None:
    """Rank 1 alone is signalled before step 3; both ranks must stop at the same step boundary."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    stopped_at = None
    with StopSignal() as stop:
        for step in range(1, 10):
            if rank == 1 and step == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05 * rank)  # the signalled rank is also the slower one
            if stop.should_stop():
                stopped_at = step
                break
    Path(out, f"rank{rank}.json").write_text(json.dumps({"step": stopped_at, "signal": stop.name}))
    dist.destroy_process_group()


@pytest.mark.dist
def test_all_ranks_stop_at_the_same_step_when_only_one_is_signalled(tmp_path):
    import torch.multiprocessing as mp

    from ar2diff.trainer.distributed import free_port

    mp.spawn(_stop_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results == [{"step": 3, "signal": "SIGTERM"}] * 2


def test_a_stop_wrapped_by_a_library_is_still_a_stop():
    """datasets wraps whatever its generator raises in DatasetGenerationError (raised `from` it): the command line
    finds the StopRequested in the chain and exits as a set-up stop, not as an error."""
    from datasets.exceptions import DatasetGenerationError

    from ar2diff.train import stop_within

    try:
        try:
            raise StopRequested("SIGTERM")
        except StopRequested as stop:
            raise DatasetGenerationError("An error occurred while generating the dataset") from stop
    except DatasetGenerationError as wrapped:
        assert isinstance(stop_within(wrapped), StopRequested)
    assert stop_within(ValueError("unrelated")) is None
