"""Hydra's composition errors (an unknown key, a missing group option, an override it cannot parse) reach the user as
one line, printed once by rank 0, exit status 1, no traceback, like ar2diff's own config errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException

from ar2diff.cli_errors import hydra_error_line
from tiny import env

HYDRA_NOISE = ("Traceback", "HYDRA_FULL_ERROR", "full_key:", "Config search path", "provider=")


def train(*args, ranks: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "ar2diff.train"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m",
        "ar2diff.train"]
    # not launch.run_ranks: torchrun stops rank 1 with SIGTERM once rank 0 has failed, which is not a crash to retry
    return subprocess.run([*launcher, "recipe=quickstart", *args], env=env(), capture_output=True, text=True,
                          timeout=120)


@pytest.mark.e2e
@pytest.mark.parametrize("override, expected", [
    ("trainer.nonexistent=1", "Could not override 'trainer.nonexistent': Key 'nonexistent' not in 'TrainerConfig'; "
                              "to append to your config use +trainer.nonexistent=1"),
    ("model=nosuch", "Could not find 'model/nosuch'; available options in 'model': hf, tiny_qwen3_moe, tiny_zaya, "
                     "zaya1_8b"),
    ("foo=[", "cannot parse the override 'foo=[': no viable alternative at input '['"),
    ("trainer.ckpt_every=abc", "Error merging override trainer.ckpt_every=abc: Value 'abc' of type 'str' could not "
                               "be converted to Integer"),
])
def test_a_composition_error_is_one_line_naming_the_key(override, expected):
    proc = train(override)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [proc.stderr.strip()]  # stderr is that line and nothing else
    assert proc.stderr.startswith("ar2diff.train: error: ") and expected in proc.stderr
    assert not any(noise in proc.stdout + proc.stderr for noise in HYDRA_NOISE)


@pytest.mark.dist
def test_under_torchrun_the_error_is_printed_once_by_rank_0():
    proc = train("trainer.nonexistent=1", ranks=2)
    assert proc.returncode != 0
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "trainer.nonexistent" in line]
    assert ours == ["ar2diff.train: error: Could not override 'trainer.nonexistent': Key 'nonexistent' not in "
                    "'TrainerConfig'; to append to your config use +trainer.nonexistent=1"]
    assert "HYDRA_FULL_ERROR" not in proc.stderr and "[rank1]" not in proc.stderr


@pytest.mark.parametrize("override, expected", [
    ("x=`", "cannot parse the override 'x=`': unexpected character at column 3"),
    ("x=${", "cannot parse the override 'x=${': extraneous input '{' expecting <EOF>"),
    ("a=b=c", "cannot parse the override 'a=b=c': mismatched input '=' expecting <EOF>"),
])
def test_override_parse_errors_name_the_override_and_the_place(override, expected):
    with pytest.raises(OverrideParseException) as caught:
        OverridesParser.create().parse_overrides([override])
    line = hydra_error_line(caught.value)
    assert line.startswith(expected) and "\n" not in line


@pytest.mark.e2e
def test_a_user_set_hydra_full_error_keeps_hydras_traceback():
    proc = subprocess.run([sys.executable, "-m", "ar2diff.train", "recipe=quickstart", "trainer.nonexistent=1"],
                          env=dict(env(), HYDRA_FULL_ERROR="1"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigCompositionException" in proc.stderr


def test_an_error_only_a_later_rank_meets_is_still_printed(monkeypatch, capsys):
    """Rank 0 prints a shared error at once; another rank waits for rank 0 to end the job, and prints its own line
    only when it is still alive after the grace period (rank 0 never met the error)."""
    from ar2diff import cli_errors

    waits = []
    monkeypatch.setattr(cli_errors.time, "sleep", waits.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli_errors.report("ar2diff.train", FileNotFoundError("no /local/x on this node"), rank=1) == 1
    assert waits == [cli_errors.RANK0_GRACE_S]
    assert capsys.readouterr().err == "ar2diff.train: error on rank 1: no /local/x on this node\n"
    assert cli_errors.report("ar2diff.train", ValueError("data.seq_len=0 must be > 0"), rank=0) == 1
    assert waits == [cli_errors.RANK0_GRACE_S] and capsys.readouterr().err == (
        "ar2diff.train: error: data.seq_len=0 must be > 0\n")
