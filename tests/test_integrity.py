"""Every read verified (issue #24, items 2, 3, 7 and 8's safetensors header): a run whose checkpoints all fail their
check refuses to start from step 0 over them; a malformed completion marker means "incomplete"; the export command
refuses a checkpoint whose files changed since the save; exports record a sha256 per file and every loader (decode,
evaluate, `model.path`) refuses a flipped one, split across ranks, with an opt-out; a corrupt safetensors header is
one line naming the file."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import struct
from pathlib import Path

import pytest
import torch

from ar2diff.checkpoint.export_layout import export_model, save_run_assets
from ar2diff.checkpoint.manifest import MARKER_NAME, NoVerifiedCheckpoint, find_latest_complete, resolve_checkpoint
from ar2diff.checkpoint.reader import load_export
from ar2diff.checkpoint.resume import load_checkpoint, save_checkpoint
from ar2diff.export_format import EXPORT_MARKER_NAME, VERIFY_ENV, hash_share
from ar2diff.fs import sha256_file
from ar2diff.model import loading
from ar2diff.model.loading import load_model

_spec = importlib.util.spec_from_file_location("ckpt_worker", Path(__file__).with_name("ckpt_worker.py"))
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)

STEP1, STEP2 = "step_00000001", "step_00000002"


@pytest.fixture(scope="module", autouse=True)
def process_group():
    with W.one_rank_process_group():
        yield


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """RUN/checkpoints with two complete checkpoints (steps 1 and 2) and the run assets an export needs."""
    run = tmp_path_factory.mktemp("run")
    engine = W.make_engine(W.tiny_model("llama", seed=0), stage=1)
    save_run_assets(run / "checkpoints", engine.module.config, W.tiny_tokenizer(), W.RUN_META)
    for step in (1, 2):
        W.train_steps(engine, 1)
        save_checkpoint(engine, run / "checkpoints", step=step, client_state={"tokens_seen": 24 * step})
    return run


@pytest.fixture
def run(saved_run, tmp_path):
    """A private copy of the saved run, free to corrupt."""
    shutil.copytree(saved_run, tmp_path / "run")
    return tmp_path / "run"


def _engine():
    return W.make_engine(W.tiny_model("llama", seed=5), stage=1)


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte of `path` in place: same size, other content (what a bad disk or a stray write leaves)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def optim_file(ckpt_root: Path, tag: str) -> Path:
    return next((ckpt_root / tag).glob("*optim_states.pt"))


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------- item 2: every checkpoint corrupted


def test_resume_refuses_when_every_checkpoint_is_corrupted_and_names_them(run, caplog):
    """Before: two "falling back" warnings, then a silent start from step 0 that overwrote both checkpoints."""
    ckpt = run / "checkpoints"
    flip_byte(optim_file(ckpt, STEP2), 1000)  # same size: only the hash check sees it
    data = optim_file(ckpt, STEP1).read_bytes()
    optim_file(ckpt, STEP1).write_bytes(data[: len(data) // 2])  # truncated: the size check sees it
    before = tree(ckpt)
    with pytest.raises(NoVerifiedCheckpoint) as caught:
        load_checkpoint(_engine(), ckpt)
    message = str(caught.value)
    assert "\n" not in message and isinstance(caught.value, ValueError)  # one line through cli_errors.USER_ERRORS
    assert f"overwrite {STEP2}, {STEP1}" in message and "trainer.start_over=true" in message
    assert f"{ckpt / STEP2 / optim_file(ckpt, STEP2).name} does not match the sha256" in message
    assert f"{optim_file(ckpt, STEP1).name} has {len(data) // 2} bytes" in message
    assert tree(ckpt) == before  # nothing was touched
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert load_checkpoint(_engine(), ckpt, start_over=True) is None  # … and start_over trains from step 0
    assert "trainer.start_over=true: training from step 0" in caplog.text
    optim_file(ckpt, STEP2).write_bytes(b"")
    with pytest.raises(NoVerifiedCheckpoint, match=f"overwrite {STEP2}, {STEP1}"):
        load_checkpoint(_engine(), ckpt, verify="size")  # the size-only path refuses too


def test_a_run_whose_only_save_was_killed_before_its_marker_starts_fresh(run):
    ckpt = run / "checkpoints"
    for tag in (STEP1, STEP2):  # a save killed between its files and its marker: never complete, never resumed
        (ckpt / tag / MARKER_NAME).unlink()
    (ckpt / "step_00000003.partial").mkdir()
    assert load_checkpoint(_engine(), ckpt) is None
    assert load_checkpoint(_engine(), ckpt, verify="size") is None


def test_one_good_checkpoint_left_is_resumed_from_not_refused(run):
    ckpt = run / "checkpoints"
    flip_byte(optim_file(ckpt, STEP2), 1000)
    assert load_checkpoint(_engine(), ckpt) == {"tokens_seen": 24}


# ---------------------------------------------------------------------------- item 7: malformed markers


MALFORMED = {
    "a list": "[1, 2]",
    "a number": "7",
    "null": "null",
    "an empty object": "{}",
    "no world_size": None,  # the saved marker without the key (filled in below)
    "world_size a string": None,
    "files a list": None,
    "a file entry without size": None,
    "client_keys of numbers": None,
    "not JSON": "{\"files\": ",
    "not UTF-8": b"\xff\xfe\x00{",
}


def _malformed(kind: str, good: dict) -> str | bytes:
    edits = {"no world_size": {k: v for k, v in good.items() if k != "world_size"},
             "world_size a string": {**good, "world_size": "1"},
             "files a list": {**good, "files": sorted(good["files"])},
             "a file entry without size": {**good, "files": {n: {"sha256": e["sha256"]} for n, e in
                                                             good["files"].items()}},
             "client_keys of numbers": {**good, "client_keys": [1, 2]}}
    return MALFORMED[kind] if MALFORMED[kind] is not None else json.dumps(edits[kind])


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_malformed_marker_means_incomplete_never_a_traceback(run, kind, caplog):
    """Before: `[1, 2]` or a marker without world_size crashed resume with a TypeError/KeyError traceback."""
    ckpt = run / "checkpoints"
    marker = ckpt / STEP2 / MARKER_NAME
    content = _malformed(kind, json.loads(marker.read_text()))
    marker.write_bytes(content if isinstance(content, bytes) else content.encode())
    with caplog.at_level(logging.WARNING):
        assert load_checkpoint(_engine(), ckpt) == {"tokens_seen": 24}  # falls back to step 1
    assert f"skipping checkpoint {ckpt / STEP2}" in caplog.text
    assert find_latest_complete(ckpt).tag == STEP1
    with pytest.raises(ValueError, match=f"{STEP2} is not a complete ar2diff checkpoint: (malformed|unreadable) "
                                         "completion marker"):
        resolve_checkpoint(ckpt, STEP2)
    shutil.rmtree(ckpt / STEP1)  # the malformed one alone: refused like any failed checkpoint, still no traceback
    with pytest.raises(NoVerifiedCheckpoint, match=f"overwrite {STEP2}"):
        load_checkpoint(_engine(), ckpt)


# ---------------------------------------------------------------------- item 3: the export command verifies


def test_export_of_a_flipped_checkpoint_is_refused_naming_the_file(run, tmp_path, capsys):
    """Before: a same-size flip in the fp32 master weights of the newest checkpoint exported with exit 0."""
    from ar2diff.export import main

    ckpt = run / "checkpoints"
    optim = optim_file(ckpt, STEP2)
    flip_byte(optim, optim.stat().st_size // 2)
    out = tmp_path / "export"
    assert main(["--checkpoint", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{optim} does not match the sha256 in {MARKER_NAME}" in err
    assert f"--tag {STEP1}" in err and not out.exists()
    assert main(["--checkpoint", str(ckpt / STEP2), "--out", str(out)]) == 2  # a step folder named directly, too
    capsys.readouterr()
    assert main(["--checkpoint", str(ckpt), "--out", str(out), "--tag", STEP1]) == 0
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "anyway"), "--no-verify"]) == 0


# --------------------------------------------------------------- item 3: exports record and verify sha256


@pytest.fixture
def export(tmp_path):
    return export_model(W.tiny_model("llama", seed=0), W.tiny_tokenizer(), tmp_path / "e", {**W.RUN_META, "step": 7})


def flip_weight(export: Path, tensor: str = "model.layers.0.mlp.up_proj.weight") -> Path:
    """One byte flipped in the data of `tensor` in model.safetensors: the file loads fine, with another weight."""
    weights = export / "model.safetensors"
    header_len = struct.unpack("<Q", weights.read_bytes()[:8])[0]
    start = json.loads(weights.read_bytes()[8:8 + header_len])[tensor]["data_offsets"][0]
    flip_byte(weights, 8 + header_len + start + 2)
    return weights


def test_an_export_records_the_sha256_of_every_file(export):
    marker = json.loads((export / EXPORT_MARKER_NAME).read_text())
    files = sorted(p.name for p in export.iterdir() if p.name != EXPORT_MARKER_NAME)
    assert sorted(marker["sha256"]) == sorted(marker["files"]) == files
    assert all(marker["sha256"][name] == sha256_file(export / name) for name in files)


def test_a_flipped_export_is_refused_by_every_loader_unless_opted_out(export, monkeypatch):
    """Before: exports recorded sizes only, so decode, evaluate and model.path used a same-size flip silently."""
    clean = {k: v.clone() for k, v in load_model(export).state_dict().items()}  # not views of the mmapped file
    weights = flip_weight(export)
    expected = f"{weights} does not match its sha256 in {export / EXPORT_MARKER_NAME}"
    for load in (load_model, load_export, lambda path: load_model(path, config=None, collective=True)):
        with pytest.raises(ValueError, match=expected):
            load(export)
    flipped = load_export(export, verify=False).lm.state_dict()
    assert [k for k in clean if not torch.equal(flipped[k], clean[k])] == ["model.layers.0.mlp.up_proj.weight"]
    monkeypatch.setenv(VERIFY_ENV, "0")
    load_model(export)


def error_line(err: str, prog: str) -> str:
    """The one error line of a command's stderr (a CPU note may precede it); no traceback, no second line."""
    lines = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def test_decode_cli_refuses_a_flipped_export_in_one_line_and_no_verify_loads_it(export, capsys):
    from ar2diff.decode.cli import main

    weights = flip_weight(export)
    argv = ["--checkpoint", str(export), "--prompt", "w1 w2", "--max-new-tokens", "2"]
    assert main(argv) == 2
    line = error_line(capsys.readouterr().err, "python -m ar2diff.decode")
    assert f"{weights} does not match its sha256" in line and "--no-verify" in line
    assert main([*argv, "--no-verify"]) == 0


def test_an_export_without_hashes_loads_with_a_warning(export, caplog):
    marker = export / EXPORT_MARKER_NAME
    older = json.loads(marker.read_text())
    del older["sha256"]  # what ar2diff wrote before the hashes were recorded
    marker.write_text(json.dumps(older))
    with caplog.at_level(logging.WARNING):
        load_model(export)
    assert f"{marker} records no sha256" in caplog.text and "export the checkpoint again" in caplog.text


@pytest.mark.parametrize("world", [2, 3, 64])
def test_hash_shares_cover_every_file_once_with_the_big_ones_spread(export, world):
    shares = [hash_share(export, json.loads((export / EXPORT_MARKER_NAME).read_text())["sha256"], rank, world)
              for rank in range(world)]
    names = [name for share in shares for name in share]
    assert sorted(names) == sorted(p.name for p in export.iterdir() if p.name != EXPORT_MARKER_NAME)
    assert len(names) == len(set(names))
    assert shares[0][0] == "model.safetensors"  # the largest file leads the first share, the next go elsewhere


def test_ranks_loading_one_export_each_hash_a_share_and_agree(export, monkeypatch):
    """Rank 1 of 2 hashes only its share; a mismatch only rank 0 found is raised on rank 1 as well."""
    hashed: list[str] = []
    real = loading.hash_mismatches

    def recording(folder, hashes, names):
        hashed.extend(names)
        return real(folder, hashes, names)

    def gather(out, obj):  # rank 0 reports model.safetensors as flipped
        out[:] = [["model.safetensors"], obj]

    monkeypatch.setattr(loading, "hash_mismatches", recording)
    monkeypatch.setattr(loading.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(loading.dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(loading.dist, "get_rank", lambda *a, **k: 1)
    monkeypatch.setattr(loading.dist, "all_gather_object", gather)
    marker = json.loads((export / EXPORT_MARKER_NAME).read_text())
    with pytest.raises(ValueError, match=f"{export / 'model.safetensors'} does not match its sha256"):
        load_model(export, collective=True)
    assert hashed == hash_share(export, marker["sha256"], 1, 2) and "model.safetensors" not in hashed
    hashed.clear()
    load_model(export)  # not collective (one rank loads alone): it hashes every file itself, gathers nothing
    assert sorted(hashed) == sorted(marker["sha256"])


# --------------------------------------------------------------------- item 8: corrupt safetensors header


def corrupt_header(folder: Path) -> Path:
    """The first byte of the JSON header of model.safetensors replaced (same size): safetensors cannot parse it."""
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8] = ord("x")
    weights.write_bytes(bytes(data))
    return weights


@pytest.mark.parametrize("with_metadata", [True, False], ids=["export", "plain transformers folder"])
def test_a_corrupt_safetensors_header_is_one_line_naming_the_file(export, with_metadata):
    """Before: SafetensorError's traceback from transformers (decode, evaluate, train with model.path)."""
    if not with_metadata:
        for name in ("ar2diff.json", EXPORT_MARKER_NAME):
            (export / name).unlink()
    weights = corrupt_header(export)
    with pytest.raises(ValueError) as caught:
        load_model(export, verify=False)  # model.path and every export reader go through load_model
    assert str(caught.value).startswith(f"{weights}: not a readable safetensors file (")
    assert str(caught.value).endswith("): re-export or re-download it") and "\n" not in str(caught.value)


def test_decode_and_evaluate_report_a_corrupt_header_in_one_line(export, capsys):
    from ar2diff.decode.cli import main as decode
    from ar2diff.evaluate import main as evaluate

    weights = corrupt_header(export)
    assert decode(["--checkpoint", str(export), "--prompt", "w1"]) == 2
    assert f"{weights}: not a readable safetensors file" in error_line(capsys.readouterr().err, "python -m ar2diff.decode")
    assert evaluate(["--checkpoint", str(export)]) == 1
    assert f"{weights}: not a readable safetensors file" in error_line(capsys.readouterr().err,
                                                                       "python -m ar2diff.evaluate")


def test_a_safetensors_error_inside_transformers_is_named_too(export, monkeypatch):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    def broken(*args, **kwargs):
        raise SafetensorError("Error while deserializing header: InvalidOffset")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(ValueError, match=f"{export / 'model.safetensors'}: not a readable safetensors file "
                                         r"\(Error while deserializing header: InvalidOffset\)"):
        load_model(export, verify=False)
