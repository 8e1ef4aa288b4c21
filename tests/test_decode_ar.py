"""The AR baseline decoder: transformers `generate` parity, cache == recompute, sampling knobs, stops, metrics."""

import pytest
import torch

from ar2diff.decode.ar import DecodeConfig, DecodeResult, acceptance_histogram, decode_ar, summarize
from tiny import MASK_ID, TINY_CONFIGS, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = sorted(TINY_CONFIGS)
EOS = 2  # tiny configs' eos_token_id


def prompts(seed: int = 0, lengths=(1, 4, 9)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, MASK_ID, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_transformers_generate(arch):
    lm = tiny_model(arch, seed=2)
    cfg = DecodeConfig(max_new_tokens=12, eos_token_id=EOS)
    results = decode_ar(lm, prompts(1), cfg)
    for prompt, r in zip(prompts(1), results):
        ids = torch.tensor([prompt])
        ref = lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                          eos_token_id=EOS, pad_token_id=0)[0, len(prompt):].tolist()
        assert r.token_ids == ref
        assert r.stop == ("eos" if ref[-1] == EOS else "max_new_tokens")
        assert r.forwards == len(ref) and r.accepted == r.drafts == r.templates == [0] * len(ref)
        assert r.prompt_ids == prompt


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_gives_the_logits_of_a_full_recompute(arch):
    lm = tiny_model(arch, seed=3)
    cached = decode_ar(lm, prompts(2), DecodeConfig(max_new_tokens=10), keep_logits=True)
    full = decode_ar(lm, prompts(2), DecodeConfig(max_new_tokens=10, use_cache=False), keep_logits=True)
    for a, b in zip(cached, full):
        assert a.token_ids == b.token_ids
        assert len(a.step_logits) == a.forwards == 10
        for la, lb in zip(a.step_logits, b.step_logits):
            torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)


def test_sampling_is_seeded_and_top_p_tiny_is_greedy():
    lm = tiny_model("llama", seed=4)
    ps = prompts(3)
    hot = DecodeConfig(max_new_tokens=16, temperature=1.5, seed=7)
    first, again = decode_ar(lm, ps, hot), decode_ar(lm, ps, hot)
    other = decode_ar(lm, ps, DecodeConfig(max_new_tokens=16, temperature=1.5, seed=8))
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert [r.token_ids for r in first] != [r.token_ids for r in other]
    # prompt i uses seed + i: decoding prompt 1 alone with seed 8 repeats it
    assert decode_ar(lm, [ps[1]], DecodeConfig(max_new_tokens=16, temperature=1.5, seed=8))[0].token_ids == \
        first[1].token_ids
    greedy = decode_ar(lm, ps, DecodeConfig(max_new_tokens=16))
    nucleus = decode_ar(lm, ps, DecodeConfig(max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=3))
    assert [r.token_ids for r in nucleus] == [r.token_ids for r in greedy]
    assert [r.token_ids for r in first] != [r.token_ids for r in greedy]


def test_stops_at_eos_or_max_new_tokens():
    lm = tiny_model("llama", seed=4)
    ps = prompts(4)
    free = decode_ar(lm, ps, DecodeConfig(max_new_tokens=12))
    eos = free[0].token_ids[5]
    first_hit = free[0].token_ids.index(eos)
    stopped = decode_ar(lm, ps, DecodeConfig(max_new_tokens=12, eos_token_id=(MASK_ID + 100, eos)))
    assert stopped[0].token_ids == free[0].token_ids[:first_hit + 1] and stopped[0].stop == "eos"
    for f, s in zip(free, stopped):
        assert s.token_ids == f.token_ids[:len(s.token_ids)]
        assert s.stop == ("eos" if eos in f.token_ids else "max_new_tokens")
    assert free[0].stop == "max_new_tokens" and len(free[0].token_ids) == 12


def test_bad_prompts_are_named():
    lm = tiny_model("llama")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        decode_ar(lm, [[5], []])
    with pytest.raises(ValueError, match="outside"):
        decode_ar(lm, [[5, 500]])
    with pytest.raises(ValueError, match=r"needs 519 positions but the model's context "
                                         r"\(max_position_embeddings\) is 512"):
        decode_ar(lm, [[5] * 500], DecodeConfig(max_new_tokens=20))
    decode_ar(lm, [[5] * 500], DecodeConfig(max_new_tokens=13))  # 500 + 13 - 1 = 512 positions fit exactly
    with pytest.raises(ValueError, match="no prompts"):
        decode_ar(lm, [])
    with pytest.raises(ValueError, match="max_new_tokens"):
        DecodeConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        DecodeConfig(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        DecodeConfig(top_p=0)


def test_summary_and_histogram():
    results = [DecodeResult([1], [5, 6, 7, 8, 9], forwards=3, accepted=[0, 2, 1], drafts=[0, 3, 3], wall_time_s=0.5,
                            stop="max_new_tokens", templates=[1, 4, 4]),
               DecodeResult([1], [5, 2], forwards=2, accepted=[0, 0], drafts=[0, 3], wall_time_s=1.5, stop="eos",
                            templates=[1, 4])]
    assert acceptance_histogram(results) == [3, 1, 1]
    assert results[0].tokens_per_forward == 5 / 3
    s = summarize(results)
    assert s == {"prompts": 2, "tokens": 7, "forwards": 5, "tokens_per_forward": 7 / 5,
                 "acceptance_histogram": [3, 1, 1], "drafts_per_forward": 9 / 5, "templates_per_forward": 14 / 5,
                 "wall_time_s": 2.0, "tokens_per_s": 3.5}
    assert results[1].to_json()["stop"] == "eos" and "step_logits" not in results[1].to_json()
