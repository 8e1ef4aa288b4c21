"""Launching real ranks from tests, with one relaunch when a rank is killed by a signal.

On this 2-core CPU machine a torchrun launch has, rarely, lost a rank to SIGABRT inside third-party runtime code
("terminate called without an active exception", exit code -6) with no Python error. That is not the behaviour
under test, so such a launch is repeated once; a rank that fails with a Python error (exit code 1: an assertion,
an exception in our code) is never retried.
"""

import re
import subprocess
import warnings

SIGNAL_DEATH = re.compile(r"exitcode\s*:\s*-\d+|terminate called without an active exception")


def run_ranks(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, **kwargs), relaunched once after a signal death."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0 and SIGNAL_DEATH.search(proc.stdout + proc.stderr):
        warnings.warn(f"a rank died by a signal; relaunching once: {(proc.stdout + proc.stderr)[-400:]}")
        proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    return proc
