"""Exports: DeepSpeed checkpoints (ZeRO-1/2/3, 2 ranks) to transformers folders, and the export layout."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from ar2diff.checkpoint.export_layout import export_model, is_complete_export, read_metadata
from ar2diff.checkpoint.export_layout import EXPORT_MARKER_NAME, METADATA_NAME, ar2diff_version
from ar2diff.checkpoint.export import export_checkpoint
from ar2diff.export import main

_spec = importlib.util.spec_from_file_location("ckpt_worker", Path(__file__).with_name("ckpt_worker.py"))
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)
CASES = [case[0] for case in W.EXPORT_CASES]
TIED = {case[0]: case[3] for case in W.EXPORT_CASES}


RANK_JOBS = {"ckpt_train": {}}  # for the rank_jobs fixture (tests/conftest.py)


@pytest.fixture(scope="module")
def trained(rank_jobs) -> Path:
    """From the session's one 2-rank launch (ckpt_worker.train_and_save on 2 gloo ranks): a step-2 checkpoint per
    ZeRO case plus its expectations."""
    return rank_jobs / "ckpt_train"


def _weight_keys(folder: Path) -> set[str]:
    keys = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as fh:
            keys |= set(fh.keys())
    return keys


@pytest.mark.dist
@pytest.mark.parametrize("case", CASES)
def test_two_rank_resume_reproduces_losses(trained, case):
    """Written by the worker: on both ranks, the resumed engine's losses equal the original's."""
    verdicts = torch.load(trained / case / "expected.pt")["resume"]
    assert verdicts == [{"client": True, "losses": True}] * 2


@pytest.mark.dist
@pytest.mark.parametrize("case", CASES)
def test_export_equals_training_weights_and_logits(trained, tmp_path, case):
    dest = tmp_path / "export"
    assert main(["--checkpoint", str(trained / case), "--out", str(dest)]) == 0
    expected = torch.load(trained / case / "expected.pt")

    model = AutoModelForCausalLM.from_pretrained(dest).eval()
    params = dict(model.named_parameters())
    assert params.keys() == expected["params"].keys()
    assert all(torch.equal(params[k], v) for k, v in expected["params"].items())
    with torch.no_grad():
        logits = model(input_ids=W.fixed_ids()).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)

    assert (model.config.mask_token_id, model.config.tidar_block_size) == (W.MASK_ID, W.BLOCK)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    assert (tokenizer.mask_token, tokenizer.mask_token_id) == ("[MASK]", W.MASK_ID)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == TIED[case]
    assert ("lm_head.weight" in _weight_keys(dest)) == (not TIED[case])
    assert (dest / "generation_config.json").is_file()
    assert is_complete_export(dest)
    assert read_metadata(dest) == {
        **W.RUN_META, "step": 2, "tokens_seen": 96, "ar2diff_version": ar2diff_version(),
        "source_checkpoint": str((trained / case / "step_00000002").resolve())}


@pytest.mark.dist
def test_sharded_bf16_export_from_tag_folder(trained, tmp_path):
    dest = export_checkpoint(trained / "z3_moe" / "step_00000002", tmp_path / "out", dtype="bfloat16",
                             max_shard_size="20KB", extra_metadata={"tokens_seen": 7, "note": "trainer's"})
    assert {k: read_metadata(dest)[k] for k in ("step", "tokens_seen", "note")} == {
        "step": 2, "tokens_seen": 7, "note": "trainer's"}
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in index["weight_map"]  # transformers' on-disk MoE keys
    model = AutoModelForCausalLM.from_pretrained(dest)
    expected = torch.load(trained / "z3_moe" / "expected.pt")["params"]
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    assert all(torch.equal(params[k], v.to(torch.bfloat16)) for k, v in expected.items())


@pytest.mark.dist
def test_base_folder_replaces_missing_run_assets(trained, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(trained / "z1_llama" / "step_00000002", root / "step_00000002")
    assert main(["--checkpoint", str(root), "--out", str(tmp_path / "a")]) == 2
    base = trained / "z1_llama" / "hf"
    assert main(["--checkpoint", str(root), "--out", str(tmp_path / "b"), "--base", str(base)]) == 0
    assert read_metadata(tmp_path / "b")["base_model"] == "tiny-from-config"


@pytest.mark.dist
def test_cli_errors_name_the_bad_path(trained, tmp_path, capsys):
    def error(*argv: str) -> str:
        assert main(list(argv)) == 2
        return capsys.readouterr().err

    assert "checkpoint path" in error("--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    (tmp_path / "root" / "step_00000009.partial").mkdir(parents=True)
    assert "no complete checkpoint under" in error("--checkpoint", str(tmp_path / "root"), "--out", str(tmp_path / "o"))
    root = tmp_path / "nohf"
    shutil.copytree(trained / "z2_llama" / "step_00000002", root / "step_00000002")
    assert f"{root / 'hf'} is missing" in error("--checkpoint", str(root), "--out", str(tmp_path / "o"))
    (tmp_path / "taken").mkdir()
    assert "--overwrite" in error("--checkpoint", str(trained / "z2_llama"), "--out", str(tmp_path / "taken"))
    msg = error("--checkpoint", str(trained / "z2_llama"), "--tag", "step_00000007", "--out", str(tmp_path / "o"))
    assert "step_00000007 is not a complete ar2diff checkpoint" in msg
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------ export_model, no DeepSpeed


@pytest.fixture
def plain():
    return W.tiny_model("llama", seed=1), W.tiny_tokenizer()


def test_export_model_strips_wrapper_prefix_and_keeps_caller_objects(plain, tmp_path):
    """Keys as DeepSpeed saves a wrapper holding the HF model at ``.lm`` (TidarLM), tied head omitted."""
    model, tokenizer = plain
    sd = {f"module.lm.{k}": v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    export_model(model, tokenizer, tmp_path / "e", {**W.RUN_META, "notes": "extra key"}, state_dict=sd)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "e")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert read_metadata(tmp_path / "e")["notes"] == "extra key"
    assert tokenizer.mask_token is None and not hasattr(model.config, "tidar_block_size")


def test_export_model_strict_keys(plain, tmp_path):
    model, tokenizer = plain
    sd = model.state_dict()
    missing = {k: v for k, v in sd.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match=r"missing keys \['model.norm.weight'\], unexpected keys \[\]"):
        export_model(model, tokenizer, tmp_path / "e", W.RUN_META, state_dict=missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['model.extra.weight'\]"):
        extra = {**sd, "model.extra.weight": sd["model.norm.weight"]}
        export_model(model, tokenizer, tmp_path / "e", W.RUN_META, state_dict=extra)
    with pytest.raises(ValueError, match="model.norm.weight"):
        bad_shape = {**sd, "model.norm.weight": torch.ones(3)}
        export_model(model, tokenizer, tmp_path / "e", W.RUN_META, state_dict=bad_shape)
    assert not (tmp_path / "e").exists()


def test_export_model_validates_metadata_and_mask_token(plain, tmp_path):
    model, tokenizer = plain
    with pytest.raises(ValueError, match=r"lacks \['block_size'\]"):
        export_model(model, tokenizer, tmp_path / "e", {"mask_token_id": 3})
    with pytest.raises(ValueError, match="outside the model vocab"):
        export_model(model, tokenizer, tmp_path / "e", {"mask_token_id": W.VOCAB, "block_size": 4})
    assert not (tmp_path / "e").exists()


def test_export_is_atomic(plain, tmp_path, monkeypatch):
    model, tokenizer = plain
    dest = tmp_path / "e"
    export_model(model, tokenizer, dest, W.RUN_META)
    first = read_metadata(dest)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        export_model(model, tokenizer, dest, {**W.RUN_META, "phase": "sft"})
    assert read_metadata(dest) == first  # the old export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # no temporary folder left behind
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_model(model, tokenizer, dest, W.RUN_META, overwrite=False)
    export_model(model, tokenizer, dest, {**W.RUN_META, "phase": "sft"})
    assert read_metadata(dest)["phase"] == "sft" and sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_incomplete_exports_are_recognised(plain, tmp_path):
    model, tokenizer = plain
    dest = export_model(model, tokenizer, tmp_path / "e", W.RUN_META)
    weights = dest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert not is_complete_export(dest)
    with pytest.raises(ValueError, match="model.safetensors is missing or has the wrong size"):
        read_metadata(dest)
    (dest / EXPORT_MARKER_NAME).unlink()
    with pytest.raises(ValueError, match="interrupted"):
        read_metadata(dest)
    (dest / METADATA_NAME).unlink()
    with pytest.raises(ValueError, match="not an ar2diff export"):
        read_metadata(dest)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_metadata(tmp_path / "nope")
    assert not is_complete_export(tmp_path / "nope")
