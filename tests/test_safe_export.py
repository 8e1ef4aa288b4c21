"""Safe export: --overwrite never deletes a run, a checkpoint folder, a file or user files; exports are readable by
everyone and never hold non-finite weights."""

from __future__ import annotations

import importlib.util
import os
import stat
from pathlib import Path

import pytest

from ar2diff.checkpoint.export_layout import export_model, read_metadata, save_run_assets
from ar2diff.checkpoint.resume import save_checkpoint
from ar2diff.export import main

_spec = importlib.util.spec_from_file_location("ckpt_worker", Path(__file__).with_name("ckpt_worker.py"))
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """RUN/checkpoints/step_00000001 + hf/, and a user's own file in RUN."""
    run = tmp_path_factory.mktemp("run")
    with W.one_rank_process_group():
        engine = W.make_engine(W.tiny_model("llama", seed=0), stage=1)
        W.train_steps(engine, 1)
        save_run_assets(run / "checkpoints", engine.module.config, W.tiny_tokenizer(), W.RUN_META)
        save_checkpoint(engine, run / "checkpoints", step=1, client_state={"tokens_seen": 24})
    (run / "notes.txt").write_text("mine")
    (run / "summary.json").write_text("{}")
    return run


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")}


@pytest.mark.parametrize("out", [".", "checkpoints", "checkpoints/step_00000001", "notes.txt"])
def test_export_onto_the_run_or_checkpoint_folder_or_a_file_is_refused_and_nothing_deleted(run_folder, out, capsys):
    before = _tree(run_folder)
    code = main(["--checkpoint", str(run_folder / "checkpoints"), "--out", str(run_folder / out), "--overwrite"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("checkpoint folder" in err or "is a file" in err)
    assert _tree(run_folder) == before


def test_overwrite_refuses_a_folder_that_is_not_an_export(run_folder, tmp_path, capsys):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    assert main(["--checkpoint", str(run_folder / "checkpoints"), "--out", str(other), "--overwrite"]) == 2
    assert "not a complete ar2diff export" in capsys.readouterr().err
    assert (other / "thesis.tex").read_text() == "years of work"


def test_overwrite_replaces_an_export_and_files_are_world_readable(run_folder, tmp_path):
    dest = tmp_path / "export"
    assert main(["--checkpoint", str(run_folder / "checkpoints"), "--out", str(dest)]) == 0
    (dest / "eval.json").write_text("{}")  # what the phase-end check adds to an export
    assert main(["--checkpoint", str(run_folder / "checkpoints"), "--out", str(dest), "--overwrite"]) == 0
    assert read_metadata(dest)["step"] == 1
    old_umask = os.umask(0o022)
    os.umask(old_umask)
    for path in [dest, *dest.iterdir()]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & stat.S_IROTH, f"{path} is {oct(mode)}"
    assert stat.S_IMODE((dest / "model.safetensors").stat().st_mode) == 0o666 & ~old_umask


def test_non_finite_weights_are_never_exported(tmp_path):
    model, tokenizer = W.tiny_model("llama", seed=0), W.tiny_tokenizer()
    sd = dict(model.state_dict())
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"].clone()
    sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite \(inf/NaN\) weights in model.layers.1.mlp.up_proj.weight"):
        export_model(model, tokenizer, tmp_path / "e", W.RUN_META, state_dict=sd)
    assert list(tmp_path.iterdir()) == []
