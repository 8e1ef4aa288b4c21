"""Shared fixtures, and the guard behind the fast lane.

Markers (registered in pyproject.toml):

- ``dist``: the test launches torchrun or several ranks/processes (training ranks, ``mp.spawn``, a multi-process
  data preparation);
- ``e2e``: the test runs a pipeline or a command line in a subprocess (``python -m ar2diff.train``, the quickstart,
  the golden curve, a script, a notebook kernel).

The fast lane is ``python -m pytest -m "not dist and not e2e"``; CI runs everything. So that the fast lane stays
free of process launches, any test that starts a process without one of these markers fails, naming itself and the
command. The guard covers ``subprocess.Popen`` (so ``subprocess.run``/``check_output``/``call`` and asyncio's
subprocesses), ``multiprocessing``/``multiprocess`` process starts, ``os.fork``, ``os.system`` and ``os.posix_spawn``,
whether the test body or one of its fixtures (of any scope) starts the process. A module- or session-scoped fixture
that launched is remembered: every later test that uses it, directly or through another fixture, must carry a marker
too, though the cached fixture launches nothing more.
"""

from __future__ import annotations

import json
import multiprocessing.process
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: two workers share the cores, so each runs one thread, and
    # so does every process a test launches (two torch processes with several OpenMP threads each on 2 cores run
    # 10-20x slower); multi-rank launches already run one thread per rank
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
LAUNCH_MARKERS = ("dist", "e2e")

# Libraries that run a helper program from inside an in-process call: that is not a process the test launches, so
# it is allowed (matched by the calling library file). Keep this list short and specific.
LIBRARY_HELPERS = {
    os.path.join("torch", "utils", "cpp_extension.py"): "ninja/compiler of a just-in-time native op",
    os.path.join("deepspeed", "ops", "op_builder", ""): "DeepSpeed's build of its CPU comm op (engine start-up)",
    os.path.join("torch", "_inductor", ""): "inductor's C++ compiler and compile workers (torch.compile)",
    os.path.join("deepspeed", "utils", "numa.py"): "DeepSpeed's `numactl --hardware` probe (CPU device count)",
    os.path.join("lm_eval", "loggers", "utils.py"): "lm-eval's `git describe` for its results metadata",
}

# What a launcher sets for its ranks; a launch from a test starts without them (pytest may hold a one-rank group's).
RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

_current: dict = {"item": None}
_fixture_stack: list = []  # FixtureDefs whose setup is running now (outermost first)
_launching_fixtures: dict = {}  # FixtureDef -> the launch it made, for fixtures that started a process
_originals: list[tuple[object, str, object]] = []


def launch_marked(item: pytest.Item) -> bool:
    return any(item.get_closest_marker(name) is not None for name in LAUNCH_MARKERS)


def _command(cmd) -> str:
    if isinstance(cmd, (list, tuple)):
        cmd = " ".join(map(str, cmd))
    return repr(str(cmd)[:200])


def _describe_popen(self, args=None, *rest, **kwargs) -> str:
    return f"subprocess {_command(kwargs.get('args', args))}"


def _describe_start(self, *args, **kwargs) -> str:
    target = getattr(self, "_target", None)
    return f"process start {self.name!r} (target {getattr(target, '__qualname__', target)!r})"


def _library_helper() -> bool:
    """Whether the launch comes from one of LIBRARY_HELPERS (looked up on the call stack)."""
    frame = sys._getframe(2)
    while frame is not None:
        if any(part in frame.f_code.co_filename for part in LIBRARY_HELPERS):
            return True
        frame = frame.f_back
    return False


def check_launch(what: str) -> None:
    """Called just before a process starts: fail the running test unless it is marked dist or e2e."""
    item = _current["item"]
    if item is None or _library_helper():  # no test running (collection, start-up), or a library's helper
        return
    for fixturedef in _fixture_stack:
        _launching_fixtures.setdefault(fixturedef, what)
    if launch_marked(item):
        return
    where = f" (in fixture {_fixture_stack[-1].argname!r})" if _fixture_stack else ""
    pytest.fail(f"test {item.nodeid} starts a subprocess but is not marked dist or e2e{where}: {what}. Mark it "
                "@pytest.mark.e2e (a command line or pipeline in a subprocess) or @pytest.mark.dist (torchrun, "
                "several ranks or processes); see tests/conftest.py", pytrace=False)


def _guarded(owner: object, name: str, describe) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        check_launch(describe(*args, **kwargs))
        return original(*args, **kwargs)

    wrapper.__wrapped__ = original
    _originals.append((owner, name, original))
    setattr(owner, name, wrapper)


def install_guard() -> None:
    _guarded(subprocess.Popen, "__init__", _describe_popen)
    _guarded(multiprocessing.process.BaseProcess, "start", _describe_start)
    try:  # the dill-based copy of multiprocessing that `datasets` uses for map(num_proc=N)
        import multiprocess.process
    except ImportError:
        pass
    else:
        _guarded(multiprocess.process.BaseProcess, "start", _describe_start)
    for name in ("fork", "forkpty", "system", "posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            _guarded(os, name, lambda *args, _name=name, **kwargs: f"os.{_name} {_command(args[0]) if args else ''}")


def uninstall_guard() -> None:
    while _originals:
        owner, name, original = _originals.pop()
        setattr(owner, name, original)


def pytest_configure(config):
    install_guard()


def pytest_unconfigure(config):
    uninstall_guard()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """The current test, for the guard: fixtures of every scope are set up (and torn down) inside its protocol."""
    _current["item"] = item
    try:
        yield
    finally:
        _current["item"] = None


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_fixture_setup(fixturedef, request):
    _fixture_stack.append(fixturedef)
    try:
        yield
    finally:
        _fixture_stack.pop()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """A test that uses a fixture which already launched (cached at module/session scope) must be marked too."""
    if launch_marked(item):
        return
    info = getattr(item, "_fixtureinfo", None)
    for name in getattr(item, "fixturenames", ()):
        defs = info.name2fixturedefs.get(name, ()) if info is not None else ()
        for fixturedef in defs:
            if fixturedef in _launching_fixtures:
                pytest.fail(f"test {item.nodeid} starts a subprocess but is not marked dist or e2e (through fixture "
                            f"{name!r}, which ran {_launching_fixtures[fixturedef]})", pytrace=False)


# ------------------------------------------------------------------------------------------------ shared fixtures


@pytest.fixture(scope="module")
def one_thread():
    """Tiny forwards are overhead-bound; a second thread only adds contention on the 2-core CI machine.
    Use as `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs under tmp_path (mount/umount run as subprocesses: its users are e2e); skipped without root."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


@pytest.fixture(scope="session")
def rank_jobs(request, tmp_path_factory) -> Path:
    """The output folder of one `torchrun --nproc_per_node 2 tests/rank_jobs.py` launch that runs every 2-rank worker
    job this session's tests need: a test module that uses this fixture names its jobs in `RANK_JOBS` (job ->
    arguments, see tests/rank_jobs.py); only the jobs of the selected tests run."""
    from filelock import FileLock
    from launch import failure_log, run_ranks

    jobs: dict = {}
    for item in request.session.items:  # under pytest-xdist every worker collects the whole selection: same jobs
        if "rank_jobs" in getattr(item, "fixturenames", ()):
            jobs.update(getattr(item.module, "RANK_JOBS", {}))
    # one launch for the whole run: under pytest-xdist the first worker to get here launches, the others wait for it
    # and read its folder (the temporary root is shared by the workers, one level up from each worker's own)
    shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else None
    if shared is None:
        return _launch_rank_jobs(tmp_path_factory.mktemp("rank-jobs"), jobs, run_ranks, failure_log)
    out, done = shared / "rank-jobs", shared / "rank-jobs.done"
    with FileLock(str(shared / "rank-jobs.lock")):
        if not done.is_file():
            _launch_rank_jobs(out, jobs, run_ranks, failure_log)
            done.write_text(json.dumps(jobs))
    assert json.loads(done.read_text()) == jobs, "the workers' sessions asked for different rank jobs"
    return out


def _launch_rank_jobs(out: Path, jobs: dict, run_ranks, failure_log) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in RANK_ENV and not k.startswith("TORCHELASTIC")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ar2diff" / "torch_extensions"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "rank_jobs.py"), str(out), json.dumps(jobs)]
    # ~35 s on 2 cores; well under the 10-minute process-group timeout, so a rank waiting forever (the fault that
    # ckpt_fail guards against) fails here first
    proc = run_ranks(cmd, cwd=REPO, env=env, timeout=480)
    assert proc.returncode == 0, failure_log(proc)
    return out
