"""The fast-lane guard of tests/conftest.py: a test (or a fixture of any scope it uses) that starts a process without
the `dist` or `e2e` marker fails, and nothing is started."""

import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import conftest

UNMARKED = "starts a subprocess but is not marked dist or e2e"


def _touch(path: str) -> None:
    Path(path).touch()


def test_an_unmarked_subprocess_fails_the_test_and_starts_nothing(tmp_path, request):
    flag = tmp_path / "ran"
    code = f"open({str(flag)!r}, 'w').close()"
    for launch in (subprocess.run, subprocess.check_output, subprocess.Popen):
        with pytest.raises(pytest.fail.Exception) as failed:
            launch([sys.executable, "-c", code])
        message = str(failed.value)
        assert message.startswith(f"test {request.node.nodeid} {UNMARKED}: subprocess ") and sys.executable in message
    with pytest.raises(pytest.fail.Exception, match=f"{UNMARKED}: os.system"):
        os.system(f"touch {flag}")
    assert not flag.exists()


def test_an_unmarked_process_start_or_fork_fails_the_test(tmp_path):
    process = multiprocessing.get_context("spawn").Process(target=_touch, args=(str(tmp_path / "ran"),))
    with pytest.raises(pytest.fail.Exception, match=f"{UNMARKED}: process start"):
        process.start()
    with pytest.raises(pytest.fail.Exception, match=f"{UNMARKED}: os.fork"):
        os.fork()
    assert not (tmp_path / "ran").exists()


def test_a_library_helper_program_is_not_the_tests_launch(tmp_path):
    """DeepSpeed's numactl probe, lm-eval's git hash, JIT builds: allowed when the call comes from such a file."""
    helper = os.path.join("site-packages", "deepspeed", "utils", "numa.py")
    assert any(part in helper for part in conftest.LIBRARY_HELPERS)
    scope = {"subprocess": subprocess, "sys": sys}
    exec(compile("out = subprocess.check_output([sys.executable, '-c', 'print(7)'], text=True)", helper, "exec"), scope)
    assert scope["out"] == "7\n"


INNER_TESTS = '''
import subprocess
import sys

import pytest


def launch():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


@pytest.fixture(scope="module")
def module_launch():
    launch()
    return "launched"


@pytest.fixture(scope="session")
def session_launch():
    launch()
    return "launched"


@pytest.fixture
def outer(session_launch):
    return session_launch


def test_body_unmarked():
    launch()


@pytest.mark.e2e
def test_body_e2e():
    launch()


@pytest.mark.dist
def test_body_dist():
    launch()


def test_module_fixture_unmarked_first(module_launch):
    pass


@pytest.mark.dist
def test_session_fixture_marked_first(outer):
    pass


def test_session_fixture_cached_unmarked(outer):
    pass


def test_no_launch():
    pass
'''


@pytest.mark.e2e
def test_a_pytest_run_fails_unmarked_launches_in_bodies_and_fixtures_of_any_scope(tmp_path):
    """In a pytest run of its own (this conftest): an unmarked test fails whether it launches in its body, in a
    module-scoped fixture that it sets up, or through a session-scoped fixture that a marked test launched first
    (cached: nothing is launched again, the test still fails)."""
    (tmp_path / "conftest.py").write_text(Path(conftest.__file__).read_text())
    (tmp_path / "pytest.ini").write_text(textwrap.dedent("""\
        [pytest]
        markers =
            dist: launches ranks
            e2e: end to end
    """))
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS" and not k.startswith("PYTEST_XDIST")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-q", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    outcomes = {}
    for line in proc.stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("PASSED", "FAILED", "ERROR") and "::" in rest:
            outcomes[rest.split("::")[1].split(" ")[0]] = word
    assert outcomes == {
        "test_body_unmarked": "FAILED", "test_body_e2e": "PASSED", "test_body_dist": "PASSED",
        "test_module_fixture_unmarked_first": "ERROR", "test_session_fixture_marked_first": "PASSED",
        "test_session_fixture_cached_unmarked": "ERROR", "test_no_launch": "PASSED"}, proc.stdout[-4000:]
    assert f"test_inner.py::test_body_unmarked {UNMARKED}: subprocess" in proc.stdout
    assert f"test_inner.py::test_module_fixture_unmarked_first {UNMARKED} (in fixture 'module_launch')" in proc.stdout
    assert (f"test_inner.py::test_session_fixture_cached_unmarked {UNMARKED} (through fixture 'session_launch', "
            "which ran subprocess") in proc.stdout
