"""Launching real ranks from tests, with one relaunch when a rank is killed by a signal.

On this 2-core CPU machine a torchrun launch has, rarely, lost a rank to SIGABRT inside third-party runtime code
("terminate called without an active exception", exit code -6) with no Python error. That is not the behaviour
under test, so such a launch is repeated once; a rank that fails with a Python error (exit code 1: an assertion,
an exception in our code) is never retried.
"""

import os
import re
import signal
import subprocess
import warnings

SIGNAL_DEATH = re.compile(r"exitcode\s*:\s*-\d+|terminate called without an active exception")
ROOT_CAUSE = re.compile(r"Root Cause.*?\brank\s*:\s*(\d+)", re.S)


def run_ranks(cmd: list[str], timeout: float | None = None, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs), relaunched once after a
    signal death."""
    proc = _run_group(cmd, timeout, **kwargs)
    if proc.returncode != 0 and SIGNAL_DEATH.search(proc.stdout + proc.stderr):
        warnings.warn(f"a rank died by a signal; relaunching once: {(proc.stdout + proc.stderr)[-400:]}")
        proc = _run_group(cmd, timeout, **kwargs)
    return proc


def _run_group(cmd: list[str], timeout: float | None, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own: on a timeout the ranks are killed with the launcher (subprocess.run
    kills only torchrun, and hung ranks would otherwise keep running, and using the CPUs, after the test)."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def failure_log(proc: subprocess.CompletedProcess, tail: int = 6000) -> str:
    """What a failed launch printed, the root-cause rank's own traceback first.

    Why: when one rank raises, every other rank fails with "Connection closed by peer" and torchrun's summary
    follows; the tail of the output is then the peers' echoes, and the first failure (the one that matters) is
    cut off. torchrun names the first failed rank under "Root Cause", and its lines carry a ``[rankN]:`` prefix.
    """
    text = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if "[WARNING]" not in line)
    found = ROOT_CAUSE.search(text)
    own = [line for line in text.splitlines() if found and line.startswith(f"[rank{found.group(1)}]:")]
    head = f"root-cause rank {found.group(1)}:\n" + "\n".join(own[-80:]) + "\n...\n" if own else ""
    return f"launch failed ({proc.returncode}):\n{head}{text[-tail:]}"
