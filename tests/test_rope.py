"""Context extension raises RoPE theta: the quickstart's extension phase raises tiny ZAYA's theta, and a phase that
lowers the starting checkpoint's theta fails before weights load, naming model.rope.rope_theta."""

import pytest

from ar2diff.config.compose import compose
from ar2diff.model.loading import make_config
from ar2diff.model.rope import check_theta_raised, rope_thetas
from tiny import TINY_CONFIGS, word_tokenizer


def quickstart_phase(recipe: str):
    pipeline = compose(["recipe=quickstart"]).pipeline
    phase = next(p for p in pipeline if p.recipe == recipe)
    return compose([f"recipe={phase.recipe}", *phase.overrides, "model.path=/base"])


def test_rope_thetas_counts_only_the_layer_types_in_use():
    zaya = make_config(TINY_CONFIGS["zaya"])  # per-layer-type entries "hybrid" (5M) and unused "hybrid_sliding"
    assert rope_thetas(zaya) == {"hybrid": 5_000_000.0}
    assert rope_thetas(make_config({**TINY_CONFIGS["llama"], "rope_theta": 123.0})) == {"default": 123.0}


def test_quickstart_context_extension_raises_theta_over_the_pretrained_base():
    base = compose(["recipe=ar_pretrain"]).model.config
    before = rope_thetas(make_config(dict(base)))
    ext = quickstart_phase("context_extension")
    assert ext.model.rope["rope_theta"] > max(before.values())
    check_theta_raised(before, {k: float(ext.model.rope["rope_theta"]) for k in before})


@pytest.mark.parametrize("theta,ok", [(40_000, False), (5_000_000, False), (20_000_000, True)])
def test_context_extension_phase_rejects_lowering_theta(tmp_path, theta, ok):
    from ar2diff.model import build_model
    from ar2diff.trainer.setup import build_phase_model

    tok = word_tokenizer(96)
    build_model(TINY_CONFIGS["zaya"]).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = compose(["recipe=context_extension", "model=hf", f"model.path={tmp_path}", "model.dtype=float32",
                   "model.attn_implementation=sdpa", "data=stdlib", "data.seq_len=64",
                   f"model.rope.rope_theta={theta}", "objective.block_size=4"])
    if ok:
        model = build_phase_model(cfg, tok)
        assert rope_thetas(model.config) == {"hybrid": float(theta)}
    else:
        with pytest.raises(ValueError, match=r"model.rope.rope_theta=.*does not raise .*hybrid layers use 5e\+06"):
            build_phase_model(cfg, tok)
