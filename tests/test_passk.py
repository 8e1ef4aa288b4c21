"""pass@k of held-out continuations: the unbiased estimator against its definition, and on a fixed trained
checkpoint lossless TiDAR sampling matches AR within the interval while a deliberately broken sampler (one that
accepts every draft without the p/q test) fails the same check."""

import itertools
from functools import lru_cache

import pytest
import torch

from ar2diff.decode.ar import DecodeConfig
from ar2diff.decode.samplers import sample
from ar2diff.decode.tidar import TidarConfig
from ar2diff.evaluation.passk import continuation_tasks, evaluate_passk, pass_at_k, passk_summary
from ar2diff.model import TidarLM
from ar2diff.objective import TidarObjective
from tiny import MASK_ID, heldout, progressions, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

TARGET, SAMPLES, PROMPTS = 6, 8, 16


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 3, 4), (4, 4, 2)])
def test_pass_at_k_is_the_probability_that_a_random_k_subset_holds_a_correct_sample(n, c, k):
    subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_passk_summary_interval_brackets_the_estimate_and_is_degenerate_when_all_agree():
    s = passk_summary([0, 2, 5, 1, 4, 3], n=5, ks=[1, 5, 9])
    assert s["pass@1"]["value"] == pytest.approx(15 / 30) and "pass@9" not in s
    assert s["pass@1"]["low"] < s["pass@1"]["value"] < s["pass@1"]["high"]
    assert s["pass@5"]["value"] == pytest.approx(5 / 6)
    flat = passk_summary([2, 2, 2], n=4, ks=[1])["pass@1"]
    assert flat["low"] == flat["value"] == flat["high"] == 0.5


def test_continuation_tasks_are_prefix_and_next_tokens_of_one_document():
    rows = heldout(6)
    tasks = continuation_tasks(rows, 5, prompt_len=6, target_len=4)
    ids = rows["input_ids"]
    assert tasks[0] == (ids[0, :6].tolist(), ids[0, 6:10].tolist())
    assert tasks[1][0] == ids[1, 4:10].tolist()  # row 1's first document (4 tokens) is too short: its second one


@lru_cache(maxsize=None)
def fixed_checkpoint() -> TidarLM:
    """120 TiDAR steps on progressions: AR continues a held-out progression well, the drafter clearly worse."""
    torch.set_num_threads(1)
    model = TidarLM(tiny_model("llama").train(), MASK_ID, block_size=4)
    objective = TidarObjective(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        loss = objective(progressions(g, 16, 24)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def run(cfgs: dict) -> dict:
    return evaluate_passk(fixed_checkpoint(), heldout(PROMPTS), cfgs, num_prompts=PROMPTS, prompt_len=6,
                          target_len=TARGET, samples=SAMPLES, ks=[1, 4, SAMPLES])


AR = DecodeConfig(max_new_tokens=TARGET, temperature=1.0)
LOSSLESS = TidarConfig(max_new_tokens=TARGET, temperature=1.0, block_size=4)


@pytest.mark.slow  # ~35 s on the 2-core machine: 3 x 8 samples of 16 prompts
def test_lossless_matches_ar_within_the_interval_and_a_broken_sampler_does_not(monkeypatch):
    result = run({"ar": AR, "lossless": LOSSLESS})
    ar = result["samplers"]["ar"]
    assert 0.2 < ar["pass@1"]["value"] < 0.8  # the check has power: neither floor nor ceiling
    assert result["vs_ar"]["lossless"]["consistent"]
    for k in (1, 4, SAMPLES):
        lossless = result["samplers"]["lossless"][f"pass@{k}"]
        assert lossless["low"] <= ar[f"pass@{k}"]["value"] <= lossless["high"]

    import ar2diff.decode.tidar as tidar

    # broken: every draft accepted (no min(1, p/q) test, no residual resampling), bonus token from p
    monkeypatch.setattr(tidar, "verify_lossless", lambda p, q, d, gen: (len(d), int(sample(p[len(d)], gen))))
    broken = run({"ar": AR, "lossless": LOSSLESS})
    assert broken["samplers"]["ar"] == ar  # same prompts, same seeds: the reference repeats exactly
    assert not broken["vs_ar"]["lossless"]["consistent"]
    assert broken["vs_ar"]["lossless"]["pass@1"]["high"] < 0
