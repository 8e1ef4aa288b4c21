"""PhaseTrainer's callback hooks on a real tiny run: a callback that stops the phase (as a preemption or a NaN guard
would) gets a checkpoint at that step boundary and no export; `on_batch` sees (and may replace) every micro batch;
`trainer.eval_every` logs held-out losses; re-running resumes and reproduces the golden loss curve exactly, so
neither the stop nor the held-out evaluation moved the training numbers."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tiny import GOLDEN, GOLDEN_KEYS, GOLDEN_OVERRIDES, env

pytestmark = pytest.mark.e2e

SCRIPT = textwrap.dedent("""
    import json, sys
    from ar2diff.config.compose import compose
    from ar2diff.pipeline import run_phase
    from ar2diff.trainer.callbacks import Callback

    class StopAt(Callback):
        def __init__(self, step):
            self.step, self.batches, self.ends = step, 0, []
        def on_batch(self, state, batch):
            self.batches += 1
            return dict(batch)
        def on_step_end(self, state):
            self.ends.append(state.step)
            if state.step == self.step:
                state.should_stop = True

    for run_dir, stop, overrides in json.loads(sys.argv[1]):  # one phase after another, in this process
        cb = StopAt(stop)
        result = run_phase(compose(overrides), run_dir, callbacks=[cb])
        print("RESULT " + json.dumps({"batches": cb.batches, "ends": cb.ends,
                                      "export_dir": None if result.export_dir is None else str(result.export_dir)}))
""")


def launch_phases(*phases: tuple[Path, int, list[str]], cache: Path) -> list[dict]:
    """One process runs each (run_dir, stop step, overrides) phase in turn; their callbacks' records."""
    runs = [[str(run_dir), stop, [*overrides, f"data.cache_dir={cache}"]] for run_dir, stop, overrides in phases]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(runs)], env=env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(x[len("RESULT "):]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]


def launch(run_dir: Path, stop: int, cache: Path, overrides=GOLDEN_OVERRIDES) -> dict:
    (result,) = launch_phases((run_dir, stop, overrides), cache=cache)
    return result


def test_stop_callback_checkpoints_then_rerun_resumes_to_the_golden_curve(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    first = launch(run_dir, 3, cache)
    assert first["ends"] == [1, 2, 3] and first["batches"] == 3 * 2  # 2 micro batches per step (batch 4, micro 2)
    assert first["export_dir"] is None and not (run_dir / "export").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000003"]

    second = launch(run_dir, 0, cache)
    assert second["ends"] == list(range(4, 9)) and second["export_dir"] == str(run_dir / "export")
    history = json.loads((run_dir / "summary.json").read_text())["history"]
    train = [{"step": h["step"], **{k: h[k] for k in GOLDEN_KEYS}} for h in history if "train/loss" in h]
    assert train == json.loads(GOLDEN.read_text())["curve"]  # bit-exact on this machine


def test_eval_every_logs_heldout_losses_without_moving_the_training_numbers(tmp_path):
    cache = tmp_path / "cache"
    short = [o for o in GOLDEN_OVERRIDES if not o.startswith("budget.tokens=")] + ["budget.tokens=1024",
                                                                            "data.heldout_fraction=0.3"]
    # both phases in one process (a launch less); each phase seeds and builds everything it trains
    launch_phases((tmp_path / "plain", 0, short), (tmp_path / "eval", 0, [*short, "trainer.eval_every=2"]), cache=cache)
    plain = json.loads((tmp_path / "plain" / "summary.json").read_text())["history"]
    evald = json.loads((tmp_path / "eval" / "summary.json").read_text())["history"]
    heldout = [h for h in evald if "heldout/loss" in h]
    assert [h["step"] for h in heldout] == [2, 4]
    assert all(h["heldout/loss_ar"] > 0 and h["heldout/loss_diff"] > 0 for h in heldout)
    assert heldout[1]["heldout/loss"] < heldout[0]["heldout/loss"]  # it learns on held-out data too
    train = [{k: v for k, v in h.items() if k not in ("train/tokens_per_s", "train/step_seconds")}
             for h in evald if "train/loss" in h]
    assert train == [{k: v for k, v in h.items() if k not in ("train/tokens_per_s", "train/step_seconds")}
                     for h in plain if "train/loss" in h]


LEGACY = Path(__file__).parent / "data"


def test_a_checkpoint_written_before_the_package_layers_resumes_to_the_same_numbers(tmp_path):
    """tests/data/legacy_run is a run stopped after step 3 by the code before the trainer's end-of-phase and
    state_dict rewrite (router balancing on, so its controller's state is in the checkpoint);
    tests/data/legacy_curve.json is the same run uninterrupted, by that code. The current code resumes it and logs
    steps 4-8 bit for bit, and its own summary keeps the old run's first three steps."""
    run_dir = tmp_path / "run"
    shutil.copytree(LEGACY / "legacy_run", run_dir)
    overrides = [o for o in GOLDEN_OVERRIDES if o != "router_balance.enabled=false"]
    resumed = launch(run_dir, 0, tmp_path / "cache", overrides)
    assert resumed["ends"] == list(range(4, 9)) and resumed["export_dir"] == str(run_dir / "export")
    want = json.loads((LEGACY / "legacy_curve.json").read_text())["curve"]
    history = json.loads((run_dir / "summary.json").read_text())["history"]
    got = [{k: h[k] for k in want[0]} for h in history if "train/loss" in h]
    assert got == want


SIGNAL_AT_END = textwrap.dedent("""
    import json, os, signal, sys
    from ar2diff.config.compose import compose
    from ar2diff.pipeline import run_phase
    from ar2diff.trainer.callbacks import Callback
    from ar2diff.trainer.faults import Preempted

    class SignalAtLastStep(Callback):
        def on_step_end(self, state):
            if state.step == state.budget.steps:
                os.kill(os.getpid(), signal.SIGTERM)  # after the last step: only `finish` can still see it

    run_dir, overrides = sys.argv[1], sys.argv[2:]
    try:
        run_phase(compose(overrides), run_dir, callbacks=[SignalAtLastStep()])
        print("RESULT done")
    except Preempted as stopped:
        print("RESULT stopped", stopped)
""")


def test_a_stop_signal_after_the_last_step_stops_the_end_of_the_phase_and_the_rerun_finishes_it(tmp_path):
    """`PhaseTrainer.finish` reads the stop signal between its steps: a SIGTERM after the last step skips the export
    (the phase is stopped, not done, and says so in summary.json); the re-run trains nothing and exports."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-c", SIGNAL_AT_END, str(run_dir), *GOLDEN_OVERRIDES, f"data.cache_dir={tmp_path / 'cache'}"]
    first = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "RESULT stopped" in first.stdout, first.stdout[-2000:] + first.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["steps"] == 8 and not (run_dir / "export").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000008"]

    second = launch(run_dir, 0, tmp_path / "cache")
    assert second["ends"] == [] and second["export_dir"] == str(run_dir / "export")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and (run_dir / "export" / "model.safetensors").is_file()
