"""Up-front validation: a pipeline's bad inputs fail before phase 1 trains, with one line naming the key and file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ar2diff.config.compose import compose
from ar2diff.preflight import check_phase_inputs, phase_complete
from tiny import env


def train(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ar2diff.train", *args], env=env(), capture_output=True, text=True,
                          timeout=timeout)


def error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "base").mkdir()
    pretrain = tmp_path / "pretrain.jsonl"
    pretrain.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(300)))
    bad_chat = tmp_path / "chat.jsonl"
    bad_chat.write_text('{"messages": "not a list"}\n{"text": "no messages"}\nnot json at all\n')
    return tmp_path


@pytest.mark.e2e
def test_bad_chat_data_fails_before_phase_1_trains(inputs):
    run_dir = inputs / "run"
    proc = train("recipe=tidar_pipeline", f"run_dir={run_dir}", f"model.path={inputs / 'base'}",
                 f"inputs.pretrain_data={inputs / 'pretrain.jsonl'}", f"inputs.chat_data={inputs / 'chat.jsonl'}",
                 "data.heldout_fraction=0.2", "logger=none")
    line = error_line(proc)
    assert "pipeline phase 2_diffusion_sft" in line and f"no usable record in {inputs / 'chat.jsonl'}" in line
    assert "'wrong_type': 1" in line and "'bad_json': 1" in line and "'missing_field': 1" in line
    assert not list(run_dir.glob("*_*/checkpoints"))  # nothing trained


@pytest.mark.e2e
def test_missing_chat_file_and_missing_inputs_name_the_key(inputs):
    proc = train("recipe=tidar_pipeline", f"run_dir={inputs / 'run'}", f"model.path={inputs / 'base'}",
                 f"inputs.pretrain_data={inputs / 'pretrain.jsonl'}", f"inputs.chat_data={inputs / 'nope.jsonl'}",
                 "data.heldout_fraction=0.2")
    assert f"data.sources[0].path='{inputs / 'nope.jsonl'}' matches no file" in error_line(proc)
    proc = train("recipe=tidar_pipeline", f"run_dir={inputs / 'run'}")
    assert "config values are required but missing: ['inputs.pretrain_data']" in error_line(proc)


def test_empty_heldout_split_and_empty_file_fail_before_training(tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "a single document"}) + "\n")
    cfg = compose([f"data.sources.0.path={one}", "data.sources.0.kind=files", "data.heldout_fraction=0.01"])
    with pytest.raises(ValueError, match="the held-out split is empty .*decoder.enabled=false"):
        check_phase_inputs(cfg)
    cfg.decoder.enabled = False
    check_phase_inputs(cfg)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = compose([f"data.sources.0.path={empty}", "data.sources.0.kind=files"])
    with pytest.raises(ValueError, match=f"{empty} is empty"):
        check_phase_inputs(cfg)


def test_phase_complete_needs_export_summary_and_eval(tmp_path):
    cfg = compose([])
    assert not phase_complete(tmp_path, cfg)
    (tmp_path / "summary.json").write_text("{}")
    assert not phase_complete(tmp_path, cfg)  # no export


def test_pipeline_rerun_goes_straight_to_the_first_unfinished_phase(tmp_path, monkeypatch):
    import importlib.util
    from types import SimpleNamespace

    import ar2diff.pipeline as T
    from ar2diff.checkpoint.export_layout import export_model
    from ar2diff.trainer.phase import PhaseResult

    spec = importlib.util.spec_from_file_location("ckpt_worker", Path(__file__).with_name("ckpt_worker.py"))
    W = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(W)
    monkeypatch.setattr(T, "init_distributed", lambda: SimpleNamespace(rank=0, world_size=1))
    small = ["data.sources.0.path=json/*", "data.heldout_fraction=0.4", "data.seq_len=64"]
    cfg = compose(["recipe=quickstart", *small])
    plan = T.plan_pipeline(cfg, small, tmp_path)
    assert [d.name for _, d, _ in plan] == ["0_ar_pretrain", "1_tidar_midtrain", "2_context_extension",
                                         "3_diffusion_sft"]
    for phase_cfg, phase_dir, _ in plan[:2]:  # phases 0 and 1 finished: export, summary (and eval for TiDAR)
        export_model(W.tiny_model("llama", seed=0), W.tiny_tokenizer(), phase_dir / "export", W.RUN_META)
        (phase_dir / "summary.json").write_text(json.dumps({"phase": phase_cfg.phase}))
    assert phase_complete(plan[0][1], plan[0][0]) and not phase_complete(plan[1][1], plan[1][0])  # no eval.json
    (plan[1][1] / "eval.json").write_text("{}")
    ran = []

    def fake_run_phase(phase_cfg, phase_dir, group=None, overrides=None, reference_data=None):
        ran.append(phase_dir.name)
        return PhaseResult(run_dir=phase_dir, export_dir=phase_dir / "export", summary={"phase": phase_cfg.phase})

    monkeypatch.setattr(T, "run_phase", fake_run_phase)
    results = T.run_pipeline(cfg, small, tmp_path)
    assert ran == ["2_context_extension", "3_diffusion_sft"]
    assert [r.summary["phase"] for r in results] == ["ar_pretrain", "tidar_midtrain", "context_extension",
                                                     "diffusion_sft"]
