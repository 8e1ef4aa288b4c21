"""Temporary folders of killed processes (issue #24 item 5): a killed export left `export.tmp-<pid>` (16 GB at 8B) and
a killed data preparation `.<name>.tmp-<pid>-<uuid>` in the shared cache, forever. Temporaries now name their
writer's pid, boot id, pid namespace and host; the next start removes those of this host whose process is gone, and
keeps those of a live process, of another host and any it cannot read."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ar2diff.data.cache import build_once
from ar2diff.fs import (
    atomic_folder,
    atomic_path,
    boot_id,
    host_name,
    owner_gone,
    pid_namespace,
    remove_stale_temporaries,
    temporary_name,
    temporary_owner,
)

REPO = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    """A pid no process has: pids stay below the kernel's pid_max."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except OSError:
        pytest.skip("no /proc/sys/kernel/pid_max to find a pid no process has")


def named(name: str, pid: int, boot: str | None = None, host: str | None = None, ns: str | None = None,
          kind: str = "tmp", unique: bool = False) -> str:
    """`temporary_name(name)` as another writer would have made it."""
    own = temporary_owner(temporary_name(name, kind, unique))
    assert own is not None and own.pid == os.getpid()
    extra = "-0badc0de" if unique else ""
    return (f"{name}.{kind}-{pid}-{boot or own.boot}-{ns or own.namespace}{extra}@{host or own.host}")


def plant(folder: Path, entry: str, size: int = 16) -> Path:
    path = folder / entry
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"\0" * size)
    return path


def test_a_temporary_name_records_its_writer_and_reads_back():
    name = temporary_name("export")
    owner = temporary_owner(name)
    assert owner is not None and (owner.name, owner.kind, owner.pid, owner.host) == ("export", "tmp", os.getpid(),
                                                                                   host_name())
    assert owner.boot == boot_id() and owner.namespace == pid_namespace()
    hidden = temporary_owner(temporary_name(".shard-0", unique=True))
    assert hidden is not None and hidden.name == ".shard-0" and hidden.pid == os.getpid()
    assert temporary_owner("export.tmp-1234") is None  # the old name says nothing about its host: never removed
    assert not owner_gone(owner)  # this process


def test_the_next_export_removes_the_leftover_of_a_dead_process_and_keeps_the_others(tmp_path):
    """The export's atomic_folder starts by cleaning beside its destination: only leftovers whose writer surely
    no longer runs go."""
    dest = tmp_path / "export"
    other_boot = "0" * 12 if boot_id() != "0" * 12 else "1" * 12
    gone = [plant(tmp_path, named("export", dead_pid())),  # killed in this boot
            plant(tmp_path, named("export", os.getppid(), boot=other_boot)),  # a pid of the previous boot
            plant(tmp_path, named("export", dead_pid(), kind="old"))]  # killed while swapping the old export out
    kept = [plant(tmp_path, named("export", os.getppid())),  # a live process (pytest's parent) still writing
            plant(tmp_path, named("export", dead_pid(), host="another-node")),  # another host: its pids are not ours
            plant(tmp_path, named("export", dead_pid(), ns="1")),  # another container on this host
            plant(tmp_path, "export.tmp-4242"),  # the old naming: whose it is cannot be told
            plant(tmp_path, named("exports", dead_pid()))]  # beside another destination
    with atomic_folder(dest) as tmp:
        assert temporary_owner(tmp.name).pid == os.getpid()
        (tmp / "config.json").write_text("{}")
    assert (dest / "config.json").is_file()
    assert [p for p in gone if p.exists()] == []
    assert [p for p in kept if not p.exists()] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([dest.name] + [p.name for p in kept])


def test_a_data_cache_build_removes_dead_leftovers_and_keeps_live_ones(tmp_path):
    parent = tmp_path / "prepared" / "corpus-0123" / "of-1"
    dead = plant(parent, named(".shard-0", dead_pid(), unique=True))
    dead_other_name = plant(parent, named(".shard-1", dead_pid(), unique=True))
    live = plant(parent, named(".shard-0", os.getppid(), unique=True))
    remote = plant(parent, named(".shard-0", dead_pid(), host="another-node", unique=True))
    build_once(parent / "shard-0", lambda tmp: (tmp / "train.json").write_text("{}"))
    assert (parent / "shard-0" / "train.json").is_file()
    assert not dead.exists() and not dead_other_name.exists() and live.exists() and remote.exists()


def test_atomic_file_writes_clean_up_their_own_leftovers(tmp_path):
    target = tmp_path / "summary.json"
    dead = tmp_path / named(".summary.json", dead_pid())
    dead.write_text("half")
    live = tmp_path / named(".summary.json", os.getppid())
    live.write_text("half")
    with atomic_path(target) as tmp:
        tmp.write_text("{}")
    assert target.read_text() == "{}" and not dead.exists() and live.exists()


def test_removal_is_reported_and_a_missing_folder_is_no_error(tmp_path, caplog):
    assert remove_stale_temporaries(tmp_path / "nowhere") == []
    leftover = plant(tmp_path, named("export", dead_pid()))
    with caplog.at_level("WARNING"):
        assert remove_stale_temporaries(tmp_path) == [leftover]
    assert f"removed {leftover}" in caplog.text and "which is gone" in caplog.text


CHILD = """
import sys, time
from pathlib import Path
from ar2diff.fs import atomic_folder
from ar2diff.data.cache import build_once
root = Path(sys.argv[1])

def hang(tmp):
    (tmp / "train.tokens.bin").write_bytes(b"\\0" * 4096)
    print("writing", flush=True)
    time.sleep(600)

with atomic_folder(root / "export") as tmp:
    (tmp / "model.safetensors").write_bytes(b"\\0" * 4096)
    build_once(root / "cache" / "shard-0", hang)
"""


@pytest.mark.e2e
def test_the_leftovers_of_a_killed_export_and_preparation_go_at_the_next_start_a_running_writers_stay(tmp_path):
    """Two writers stop in the middle of an export and a data-cache build: one is SIGKILLed, one still runs. The
    next export and build remove the killed one's temporaries and leave the running one's alone."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    killed_root, live_root = tmp_path / "killed", tmp_path / "live"
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(root)], stdout=subprocess.PIPE, text=True,
                                 env=env) for root in (killed_root, live_root)]
    try:
        for child in children:
            assert child.stdout.readline().strip() == "writing"
        killed, live = children
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        left = {p.name for p in killed_root.iterdir()} | {p.name for p in (killed_root / "cache").iterdir()}
        assert any(re.fullmatch(rf"export\.tmp-{killed.pid}-.*", n) for n in left)
        assert any(re.fullmatch(rf"\.shard-0\.tmp-{killed.pid}-.*", n) for n in left)
        for root in (killed_root, live_root):  # the next start in each folder, beside the leftovers
            with atomic_folder(root / "export") as tmp:
                (tmp / "config.json").write_text("{}")
            build_once(root / "cache" / "shard-0", lambda tmp: (tmp / "train.json").write_text("{}"))
        assert sorted(p.name for p in killed_root.iterdir()) == ["cache", "export"]
        assert sorted(p.name for p in (killed_root / "cache").iterdir()) == ["shard-0"]
        assert live.poll() is None
        assert [temporary_owner(p.name).pid for p in live_root.iterdir() if temporary_owner(p.name)] == [live.pid]
        assert [temporary_owner(p.name).pid for p in (live_root / "cache").iterdir()
                if temporary_owner(p.name)] == [live.pid]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=30)
            child.stdout.close()
