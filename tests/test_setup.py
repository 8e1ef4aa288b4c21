"""Assembling a phase's model: RoPE/context overrides for context extension, [MASK], errors naming the key."""

import pytest
import torch

from ar2diff.config.compose import compose
from ar2diff.model.loading import make_config
from ar2diff.data.tokenizer import resolve_tokenizer
from ar2diff.trainer.setup import apply_rope_overrides, build_phase_model
from tiny import TINY_CONFIGS, word_tokenizer


@pytest.mark.parametrize("arch", ["zaya", "llama"])
def test_rope_override_reaches_every_layer_type_and_the_rotary_buffers(arch):
    config = make_config(TINY_CONFIGS[arch])
    apply_rope_overrides(config, {"rope_theta": 5_000_000.0}, max_positions=4096)
    params = config.rope_parameters
    entries = list(params.values()) if arch == "zaya" else [params]
    assert all(e["rope_theta"] == 5_000_000.0 for e in entries) and config.max_position_embeddings == 4096
    from ar2diff.model import build_model

    lm = build_model(config)
    rotary = lm.model.rotary_emb
    inv_freq = rotary.hybrid_inv_freq if arch == "zaya" else rotary.inv_freq
    dim = inv_freq.numel() * 2
    torch.testing.assert_close(inv_freq, 1.0 / 5_000_000.0 ** (torch.arange(0, dim, 2).float() / dim))


def test_phase_model_from_scratch_gets_the_mask_token_and_block_size():
    cfg = compose(["model=tiny_qwen3_moe", "objective.block_size=8", "data.seq_len=64"])
    tok = word_tokenizer(200)
    model = build_phase_model(cfg, tok)
    assert model.model.mask_token_id == tok.mask_token_id == 200 and model.model.block_size == 8
    assert model.config.vocab_size == 201 and model.config.tidar_block_size == 8


def test_setup_errors_name_the_key(tmp_path):
    cfg = compose(["recipe=tidar_midtrain", f"model.path={tmp_path / 'nope'}", "data.sources.0.path=/d"])
    with pytest.raises(FileNotFoundError, match="model.path=.* is not a folder"):
        resolve_tokenizer(cfg)
    cfg = compose(["recipe=tidar_midtrain", f"model.path={tmp_path}", "data.sources.0.path=/d"])
    with pytest.raises(ValueError, match="has no tokenizer files; set data.tokenizer_path"):
        resolve_tokenizer(cfg)
    cfg = compose(["data.seq_len=2048", "objective.block_size=8"])  # tiny_zaya allows 1024 positions
    with pytest.raises(ValueError, match="data.seq_len=2048 exceeds the model's max_position_embeddings=1024"):
        build_phase_model(cfg, word_tokenizer(200))
