"""scripts/reference_sweep.py: the trials' commands, the files the light checks read, and the table (no launches)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from ar2diff.data.sources import in_heldout

_spec = importlib.util.spec_from_file_location("reference_sweep",
                                               Path(__file__).parents[1] / "scripts" / "reference_sweep.py")
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)


def test_dry_run_prints_each_trials_training_and_light_check_and_runs_nothing(tmp_path, capsys):
    assert S.main(["BASE", str(tmp_path / "sweep"), "--trials", "block4,mask0.5", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    train = [line for line in lines if "ar2diff.train" in line]
    light = [line for line in lines if "ar2diff.evaluate" in line]
    assert len(train) == len(light) == 2 and not (tmp_path / "sweep").exists()
    assert "objective.block_size=4 objective.mask_ratio=1.0" in train[0]
    assert "objective.block_size=8 objective.mask_ratio=0.5" in train[1]
    for line in train:  # every trial holds out the check's band, with the same budget and schedule
        assert "data.heldout_fraction=0.03" in line and "budget.tokens=65536" in line and "schedule.lr=0.0003" in line
    for line in light:  # checked as it decodes: full masking, whatever the trial trained with
        assert "--light" in line and "objective.mask_ratio=1.0" in line and "data.heldout_fraction=0.99" in line


def test_the_check_files_are_held_out_by_every_trial_and_outside_the_reference_runs_held_out_split(tmp_path):
    rels = S.check_files(tmp_path)
    assert rels and len(list(tmp_path.iterdir())) == len(rels)
    assert all(in_heldout(r, 0.03) and not in_heldout(r, 0.02) for r in rels)


def test_table_reads_the_light_checks_and_projects_the_kept_drafts(tmp_path):
    light = tmp_path / "base" / "light"
    light.mkdir(parents=True)
    light.joinpath("light_eval.json").write_text(json.dumps({
        "heldout": {"loss_ar": 2.0, "loss_diff": 5.0},
        "agreement_by_offset": {"argmax_agree": [0.9, 0.5, 0.4, 0.1], "expected_accept": [0.8, 0.4, 0.3, 0.1]},
        "greedy": {"tokens_per_forward": {"tokens_per_forward": 1.3, "low": 1.2, "high": 1.4},
                   "agreement_tokens": 0.75}}))
    text = S.table(tmp_path, ["base", "lr1e-3"])  # lr1e-3 has no check yet: no row
    rows = text.splitlines()[2:]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[:4] == ["base", "8", "0.0003", "1"]
    assert cells[6] == "0.500 0.400 0.100"
    assert float(cells[7]) == pytest.approx(0.5 + 0.5 * 0.4 + 0.5 * 0.4 * 0.1)
    assert cells[8] == "1.300 [1.200, 1.400]" and cells[9] == "0.750"


def test_an_unknown_trial_is_refused_naming_the_known_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        S.main(["BASE", str(tmp_path), "--trials", "block32"])
    assert exit_.value.code == 2 and "unknown trial 'block32'; the trials are base, lr1e-3" in capsys.readouterr().err
