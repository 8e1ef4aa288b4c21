"""Tiny configs of every supported architecture, shared by the tests (built from configs, no downloads)."""

import pytest
import torch

VOCAB = 97  # the last id is left free for [MASK]
MASK_ID = VOCAB - 1

_common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)

TINY_CONFIGS = {
    "llama": dict(model_type="llama", intermediate_size=64, **_common),
    "qwen3": dict(model_type="qwen3", intermediate_size=64, head_dim=8, **_common),
    "qwen3_moe": dict(model_type="qwen3_moe", intermediate_size=64, moe_intermediate_size=16, head_dim=8,
                      num_experts=4, num_experts_per_tok=2, **_common),
    "mixtral": dict(model_type="mixtral", intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                    **_common),
    "olmoe": dict(model_type="olmoe", intermediate_size=32, num_experts=4, num_experts_per_tok=2, **_common),
    "zaya": dict(model_type="zaya", head_dim=8, moe_intermediate_size=16, num_experts=4, router_hidden_size=16,
                 **_common),
}


@torch.no_grad()
def randomize(model, seed: int = 0, scale: float = 0.3):
    """Perturb every parameter so no layer starts at a degenerate init (e.g. ZAYA's zero key temperature, which
    would make attention uniform and hide mask bugs)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def tiny_model(arch: str, seed: int = 0, attn: str = "sdpa"):
    from ar2diff.model import build_model

    return randomize(build_model(TINY_CONFIGS[arch], attn_implementation=attn, seed=seed), seed).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny forwards are overhead-bound; a second thread only adds contention on the 2-core CI machine.
    Use as `pytestmark = pytest.mark.usefixtures("one_thread")` after `from tiny import one_thread`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def progressions(g: torch.Generator, rows: int, length: int, m: int = 40) -> torch.Tensor:
    """Arithmetic progressions mod m over ids [3, 3+m): a pattern a tiny model learns in a few steps."""
    start = torch.randint(3, 3 + m, (rows, 1), generator=g)
    step = torch.randint(1, 4, (rows, 1), generator=g)
    return 3 + (start - 3 + step * torch.arange(length)) % m


def hf_mask_arg(lm, mask_11QK):
    """A hand-built boolean 4D mask in the form each architecture's forward takes."""
    if lm.config.model_type == "zaya":
        return {"hybrid": mask_11QK, "conv": None}
    if lm.config.model_type == "qwen3":
        return {"full_attention": mask_11QK}
    return mask_11QK
