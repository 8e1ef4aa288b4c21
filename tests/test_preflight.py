"""Up-front validation: a pipeline's bad inputs fail before phase 1 trains, with one line naming the key and file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ar2diff.config.compose import compose
from ar2diff.preflight import check_phase_inputs, phase_complete
from test_train import env


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


def test_bad_chat_data_fails_before_phase_1_trains(inputs):
    run_dir = inputs / "run"
    proc = train("recipe=tidar_pipeline", f"run_dir={run_dir}", f"model.path={inputs / 'base'}",
                 f"inputs.pretrain_data={inputs / 'pretrain.jsonl'}", f"inputs.chat_data={inputs / 'chat.jsonl'}",
                 "data.heldout_fraction=0.2", "logger=none")
    line = error_line(proc)
    assert "pipeline phase 2_diffusion_sft" in line and f"no usable record in {inputs / 'chat.jsonl'}" in line
    assert "'wrong_type': 1" in line and "'bad_json': 1" in line and "'missing_field': 1" in line
    assert not list(run_dir.glob("*_*/checkpoints"))  # nothing trained


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
