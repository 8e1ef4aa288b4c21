"""The lossless sampler stays exact on checkpoints trained with the AR (or mixed) diffusion target: greedy TiDAR
equals AR greedy, and the first two sampled tokens follow the exact AR distribution (chi-square)."""

from functools import lru_cache

import pytest
import torch

from ar2diff.decode.ar import DecodeConfig, decode_ar
from ar2diff.decode.step_layout import build_step_layout
from ar2diff.decode.tidar import TidarConfig, decode_tidar, step_forward
from ar2diff.model import TidarLM, build_model
from ar2diff.objective import DiffTarget, TidarObjective
from tiny import (MASK_ID, TINY_CONFIGS, chi_square, chi_square_critical, make_prompts, progressions, randomize,
                  tiny_model)

pytestmark = pytest.mark.usefixtures("one_thread")


def train(model: TidarLM, batches, steps: int, target: DiffTarget) -> TidarLM:
    """Train `model` with the TiDAR objective and diffusion target `target`; returns the adapter (for decoding)."""
    objective = TidarObjective(model, diff_target=target)
    opt = torch.optim.AdamW(model.lm.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = objective(batches()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@lru_cache(maxsize=None)
def aligned(kind: str) -> TidarLM:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    model = TidarLM(tiny_model("llama").train(), MASK_ID, block_size=4)
    return train(model, lambda: progressions(g, 16, 24), 60, DiffTarget(kind, weight=0.5))


@pytest.mark.parametrize("kind", ["ar", "mix"])
def test_greedy_lossless_equals_ar_greedy_on_an_aligned_checkpoint(kind):
    model, prompts = aligned(kind), make_prompts()
    ar = decode_ar(model, prompts, DecodeConfig(max_new_tokens=16))
    accepted = 0
    for levels in ("all", (1,)):
        for a, t in zip(ar, decode_tidar(model, prompts, TidarConfig(max_new_tokens=16, levels=levels))):
            assert t.token_ids == a.token_ids
            accepted += sum(t.accepted)
    assert accepted >= 3  # some aligned drafts are accepted, so acceptance paths are exercised


def test_sampled_lossless_is_exact_on_an_aligned_checkpoint():
    vocab = 6
    lm = randomize(build_model(dict(TINY_CONFIGS["llama"], vocab_size=vocab), seed=11), seed=11, scale=0.5)
    model = TidarLM(lm.train(), mask_token_id=vocab - 1, block_size=4)
    g = torch.Generator().manual_seed(1)
    train(model, lambda: torch.randint(0, vocab - 1, (8, 12), generator=g), 20, DiffTarget("ar"))
    prompt = [1, 3, 4]
    with torch.no_grad():
        p1 = torch.softmax(lm(torch.tensor([prompt])).logits[0, -1].double(), -1)
        p2 = torch.stack([torch.softmax(lm(torch.tensor([prompt + [t]])).logits[0, -1].double(), -1)
                          for t in range(vocab)])
        first = build_step_layout(prompt, [], (0,), 4, vocab - 1)
        q2 = torch.softmax(step_forward(model, first, None, 0)[0][2].double(), -1)
    exact = (p1[:, None] * p2).flatten()
    samples = 1500
    results = decode_tidar(model, [prompt] * samples, TidarConfig(max_new_tokens=3, temperature=1.0, seed=0))
    assert 0.1 * samples < sum(r.accepted[1] for r in results) < samples  # drafts accepted (and some rejected)
    counts = torch.zeros(vocab * vocab, dtype=torch.float64)
    for r in results:
        counts[r.token_ids[0] * vocab + r.token_ids[1]] += 1
    stat, df = chi_square(counts, exact)
    assert stat < chi_square_critical(df), (stat, df)
    assert not torch.allclose((p1[:, None] * q2[None]).flatten(), exact, atol=1e-3)  # q is not p: a real test
