"""Fixtures shared by the test modules (plain helpers live in tests/tiny.py)."""

import os
import subprocess

import pytest
import torch


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
    """A 6 MB tmpfs under tmp_path; skipped without root."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])
