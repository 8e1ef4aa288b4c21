"""Data-side errors of issue #24 item 8, each one line that names its file and what to do (exit 1, no traceback):
a truncated cache or token file (numpy's bare "mmap length is greater than file size"), a full disk under
data.cache_dir (a ~40-line DatasetGenerationError), `python -m ar2diff.data.prepare --help` (a Hydra traceback) and
scripts/launch_rocm_cluster.sh with a missing hostfile (a bare grep error)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ar2diff.data import DataConfig, SourceConfig, get_tokenizer, load_packed
from ar2diff.data.compact import DamagedFile
from ar2diff.data.prepare import cli

REPO = Path(__file__).resolve().parents[1]
PROG = "ar2diff.data.prepare: error: "


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    tok = get_tokenizer(DataConfig(seq_len=16, heldout_fraction=0.0, bpe_vocab_size=512, bpe_max_bytes=200_000,
                                   cache_dir=str(root / "tokcache")).validate())
    tok.save_pretrained(str(root / "tokenizer"))
    lines = [json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n" * 20}) for i in range(40)]
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return tok, root


def overrides(root: Path, cache: Path, path: Path | None = None) -> list[str]:
    return ["data=files", f"data.sources.0.path={path or root / 'corpus.jsonl'}", "+data.sources.0.name=corpus",
            f"data.tokenizer_path={root / 'tokenizer'}", "data.heldout_fraction=0.2", f"data.cache_dir={cache}",
            "num_proc=1"]


def one_error_line(capsys) -> str:
    """The one line on stderr besides `datasets`' progress bars (which a successful run prints as well)."""
    err = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
           if line.strip() and not re.search(r"examples/s\]|it/s\]", line)]
    assert len(err) == 1 and err[0].startswith(PROG), err
    return err[0]


@pytest.mark.parametrize("damage", ["truncated tokens", "truncated boundaries", "garbled stats"])
def test_a_damaged_prepared_cache_file_is_one_line_naming_it_and_the_folder_to_delete(setup, tmp_path, capsys, damage):
    tok, root = setup
    cache = tmp_path / "cache"
    assert cli(overrides(root, cache)) == 0
    (shard,) = cache.glob("prepared/corpus-*/of-1/shard-0")
    name = {"truncated tokens": "train.tokens.bin", "truncated boundaries": "train.docs.npy",
            "garbled stats": "train.json"}[damage]
    path = shard / name
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    capsys.readouterr()
    assert cli(overrides(root, cache)) == 1  # the report reads every prepared split
    line = one_error_line(capsys)
    assert str(path) in line and f"delete {shard} and re-run" in line
    cfg = DataConfig(seq_len=16, heldout_fraction=0.2, tokenizer_path=str(root / "tokenizer"), cache_dir=str(cache),
                     sources=[SourceConfig(kind="files", path=str(root / "corpus.jsonl"), name="corpus")]).validate()
    with pytest.raises(DamagedFile, match=str(path)):  # the trainer: a ValueError, so one line there too
        load_packed(cfg, tok, "train")
    shutil.rmtree(shard)  # what the line says to do
    assert cli(overrides(root, cache)) == 0


def token_overrides(root: Path, cache: Path, path: Path, tok) -> list[str]:
    return ["data=tokens", f"data.sources.0.path={path}", f"data.sources.0.eos_id={tok.eos_token_id}",
            f"data.tokenizer_path={root / 'tokenizer'}", f"data.cache_dir={cache}", "num_proc=1"]


def test_a_truncated_token_file_or_index_file_is_one_line_naming_it(setup, tmp_path, capsys):
    tok, root = setup
    ids = np.tile(np.r_[np.arange(5, 40), tok.eos_token_id].astype(np.uint16), 400)
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, ids)
    cache = tmp_path / "cache"
    assert cli(token_overrides(root, cache, tokens, tok)) == 0
    (index,) = cache.glob("index/*")
    cum = index / "f0.train.cum.npy"
    with open(cum, "r+b") as fh:
        fh.truncate(cum.stat().st_size - 16)
    capsys.readouterr()
    assert cli(token_overrides(root, cache, tokens, tok)) == 1
    line = one_error_line(capsys)
    assert str(cum) in line and "mmap length is greater than file size" in line and f"delete {index}" in line
    with open(tokens, "r+b") as fh:  # the token file itself: indexed again (new size), and refused by name
        fh.truncate(tokens.stat().st_size // 2)
    assert cli(token_overrides(root, cache, tokens, tok)) == 1
    line = one_error_line(capsys)
    assert str(tokens) in line and "truncated or not an .npy file" in line and "restore it" in line


@pytest.mark.e2e
def test_a_full_disk_under_the_cache_dir_is_one_line_naming_the_folder(setup, small_disk, capsys):
    """6 MB of disk for 8 MB of text: `datasets` fails inside its arrow writer (DatasetGenerationError, ~40 lines of
    traceback before); now one line naming the folder being prepared, and no partial folder is left."""
    _, root = setup
    big = root / "big.jsonl"
    big.write_text("\n".join(json.dumps({"text": f"x{i} = {i}\n" * 700}) for i in range(1000)) + "\n")
    assert big.stat().st_size > 8_000_000
    cache = small_disk / "cache"
    assert cli(overrides(root, cache, big)) == 1
    line = one_error_line(capsys)
    assert line.startswith(f"{PROG}disk full while writing {cache / 'prepared'}")
    assert "bytes free" in line and "data.cache_dir" in line and "re-run the same command" in line
    assert not list(cache.glob("prepared/*/of-1/shard-0")) and not list(cache.rglob("*.tmp-*"))


def run(*cmd: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(list(cmd), capture_output=True, text=True, env=env, cwd=cwd, timeout=120, check=False)


@pytest.mark.e2e
def test_prepare_help_prints_usage_and_a_bad_key_is_one_line():
    proc = run(sys.executable, "-m", "ar2diff.data.prepare", "--help")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: python -m ar2diff.data.prepare") and "shard=i/n" in proc.stdout
    proc = run(sys.executable, "-m", "ar2diff.data.prepare", "data.nosuch=1")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"{PROG}Could not override 'data.nosuch': Key 'nosuch' not in 'DataConfig'; to "
                                   "append to your config use +data.nosuch=1")


@pytest.mark.e2e
def test_the_cluster_launch_with_a_missing_or_empty_hostfile_is_one_line_naming_it(tmp_path):
    script = REPO / "scripts" / "launch_rocm_cluster.sh"
    empty = tmp_path / "hosts"
    empty.write_text("# no host yet\n\n")
    for hostfile, says in ((tmp_path / "nosuch", "does not exist or cannot be read"), (empty, "lists no host")):
        proc = run("bash", str(script), str(hostfile), "recipe=quickstart", cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert f"error: hostfile {hostfile} {says}" in lines[0] and "slots=8" in lines[0]
        assert not (tmp_path / "outputs").exists()  # nothing started, no run folder made
