"""W&B on a full disk: its debug.log handler and its finish print nothing; the run's own one-line error is all the
user reads."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tiny import env

pytestmark = pytest.mark.e2e

FILL_THEN_LOG = """
import logging, sys
from ar2diff.config.schema import LoggerConfig
from ar2diff.logging import RunLogger, configure_cli_logging
if sys.argv[2] == "cli":
    configure_cli_logging()
logger = RunLogger(sys.argv[1], 0, name="t", group=None, config={}, wandb_cfg=LoggerConfig(mode="offline"))
with open(sys.argv[1] + "/filler", "wb") as filler:  # another writer fills the disk while W&B runs
    try:
        while True:
            filler.write(bytes(1 << 16))
            filler.flush()
    except OSError:
        pass
    logging.getLogger("wandb").info("W&B logging on the full disk %s", "x" * 8192)  # more than a page: must write
    logger.close()  # what the trainer does when the phase stops on the disk-full error
print("closed", flush=True)
"""


def fill_then_log(disk, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FILL_THEN_LOG, str(disk), mode], env=env(), capture_output=True,
                          text=True, timeout=120)


def test_wandb_on_a_full_disk_prints_nothing(small_disk):
    proc = fill_then_log(small_disk, "cli")
    assert proc.returncode == 0 and proc.stdout == "closed\n", proc.stderr[-3000:]
    assert proc.stderr == ""  # not one "--- Logging error ---" block, no OSError from W&B's finish
    assert (small_disk / "wandb").is_dir()  # W&B really ran with its files on the full disk


def test_without_the_cli_logging_setup_the_same_run_floods_stderr(small_disk):
    proc = fill_then_log(small_disk, "plain")
    assert proc.stderr.count("--- Logging error ---") >= 1 and "No space left on device" in proc.stderr
