"""The TiDAR decoder: one model forward per step drafts the next block and verifies the last one.

Step (layout in `ar2diff.decode.step_layout`): the forward sees the newest committed token t_last, the k drafts
d_1..d_k proposed by the previous step (clean stream, causal) and one template of `block_size` masks per drafted
acceptance level l, placed right after d_l. Then:

1. verify: the AR logits at t_last, d_1..d_k give the verifier p (the AR distribution for "lossless", the
   logit blend for "mixing"); with the drafter distributions q stored alongside the drafts,
   `samplers.verify_lossless` accepts a prefix of a drafts and samples the next token t (residual or bonus).
2. commit d_1..d_a, t. The KV cache is cropped to the committed tokens (t is fed next step as t_last), so
   rejected drafts and every template leave no trace in it.
3. draft: the template of the closest drafted level l <= a was conditioned on x, d_1..d_l. Its masks cover the
   positions from d_{l+1} on; the first (a - l) + 1 of them fall on committed tokens (d_{l+1}..d_a and t) and
   are dropped, the rest (block_size - 1 - (a - l) of them) are sampled from q = softmax(diff logits /
   drafter temperature, top-p) and become the next drafts, stored with their q and logits. A draft for
   position p is thus always a q-sample at p, drawn after t with fresh randomness: conditionally on everything
   committed it is distributed as its q, which is all the lossless rule needs (its output is exactly the AR
   model's distribution; at temperature 0 exactly AR greedy). A level below a wastes drafts; no level <= a
   means no drafts next step. So a step verifies at most block_size - 1 drafts: each template's first mask is
   the drafter's guess for t, which the verifier supplies instead.

levels "all" is TiDAR's decoder (a template per outcome 0..k); a list like (4, 7, 10) at block 16 is Zyphra's
vLLM path (about 3 templates per forward). A step where no listed level can happen (the first step, or drafts cut
short near max_new_tokens) drafts level 0.

Cache: the committed prefix lives in a transformers DynamicCache (the one the AR decoder uses), cropped after
each step, for every architecture (`use_cache=None`). ZAYA's CCA also mixes neighbouring positions in a q/k
convolution and a delayed value: its cache layers hold the conv window and delayed value of the newest cached
token; the step's forward takes the stream index relative to the fed tokens (drafts and templates follow their
own stream predecessors, t_last the cached state), and after verification `commit_stream_state` keeps the state
of the last committed token only (`ar2diff.model.zaya`). use_cache=False recomputes the whole committed prefix
every step (the reference the cache is tested against, O(length) per step).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ar2diff.decode.common import (
    DecodeConfig,
    DecodeResult,
    check_prompts,
    decode_text,
    finish,
    inference,
    model_device,
)
from ar2diff.decode.samplers import probs_from_logits, sample, verify_lossless, verify_mixing
from ar2diff.decode.step_layout import (
    StepLayout,
    build_step_layout,
    level_for,
    next_draft_rows,
    parse_levels,
    slice_meta,
    step_levels,
)
from ar2diff.model.loading import max_positions
from ar2diff.model.tidar import TidarLM
from ar2diff.model.zaya import commit_stream_state, crop_attention

SAMPLERS = ("lossless", "mixing")


@dataclass(frozen=True)
class TidarConfig(DecodeConfig):
    """TiDAR settings on top of the shared ones.

    block_size: None = the model's (`TidarLM.block_size`). levels: "all" (or None) or acceptance levels to draft.
    sampler: "lossless" (exactly the AR distribution) or "mixing" (verifier logits (1-w)*AR + w*diffusion,
    mix_weight = w; w = 0 is lossless token for token). drafter_temperature: None = temperature.
    """

    block_size: int | None = None
    levels: str | tuple[int, ...] | None = "all"
    sampler: str = "lossless"
    mix_weight: float = 0.0
    drafter_temperature: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS} (the AR baseline is decode_ar), got {self.sampler!r}")
        if isinstance(self.mix_weight, bool) or not isinstance(self.mix_weight, (int, float)) \
                or not 0 <= self.mix_weight <= 1:
            raise ValueError(f"mix_weight must be a number in [0, 1] (0 = lossless), got {self.mix_weight!r}")
        if self.sampler == "lossless" and self.mix_weight != 0:
            raise ValueError(f"mix_weight={self.mix_weight} only applies to sampler='mixing'; set sampler='mixing' "
                             "or mix_weight=0")
        if self.block_size is not None and (isinstance(self.block_size, bool) or not isinstance(self.block_size, int)
                                            or self.block_size < 2):
            raise ValueError(f"block_size must be an integer >= 2 (one mask for the next token, at least one "
                             f"draft), got {self.block_size!r}")
        if self.drafter_temperature is not None and not self.drafter_temperature >= 0:
            raise ValueError(f"drafter_temperature must be >= 0 or None (= temperature), got "
                             f"{self.drafter_temperature!r}")

    @property
    def q_temperature(self) -> float:
        return self.temperature if self.drafter_temperature is None else self.drafter_temperature


def step_forward(model: TidarLM, layout: StepLayout, cache, cached: int):
    """Logits of layout rows layout.first.. (t_last, drafts, templates) and the cache.

    With a cache holding the first `cached` layout tokens, only the rest is fed (queries), the keys are described
    by the full records, and the stream index is relative to the fed tokens (-1: the newest cached token). Without
    one (cache None, cached 0) the whole layout is fed.
    """
    logits_BTV, _, cache = model.step(
        layout.input_ids_1L[:, cached:], layout.position_ids_1L[:, cached:], slice_meta(layout.meta, cached),
        k_meta=layout.meta, prev_BT=layout.prev_1L[:, cached:] - cached, past_key_values=cache)
    return logits_BTV[0, layout.first - cached:], cache


def crop_cache(cache, keep: int) -> None:
    """Drop every cached position from `keep` on (transformers 5.17: crop takes minus the tokens to remove)."""
    extra = cache.get_seq_length() - keep
    if extra > 0:
        cache.crop(-extra)


def verify(cfg: TidarConfig, ar_logits_KV: torch.Tensor, draft_logits_KV: torch.Tensor, draft_q_KV: torch.Tensor,
           drafts: list[int], gen: torch.Generator) -> tuple[int, int]:
    """(drafts accepted, next token) with the configured sampler."""
    drafts_K = torch.tensor(drafts, dtype=torch.long, device=ar_logits_KV.device)
    if cfg.sampler == "mixing":
        return verify_mixing(ar_logits_KV, draft_logits_KV, draft_q_KV, drafts_K, cfg.mix_weight, gen,
                             cfg.temperature, cfg.top_p)
    p_KV = probs_from_logits(ar_logits_KV, cfg.temperature, cfg.top_p)
    return verify_lossless(p_KV, draft_q_KV, drafts_K, gen)


def resolve_cache(model: TidarLM, use_cache: bool | None) -> bool:
    """None = the cache (every architecture has an exact one, ZAYA's stream state included)."""
    return True if use_cache is None else use_cache


def commit_cache(model: TidarLM, cache, cached_before: int, cached: int) -> None:
    """Keep exactly the committed prefix (`cached` tokens) in the cache after a step that fed from `cached_before`:
    attention KV cropped; for ZAYA also the conv window and delayed value of its last token."""
    if model.has_adapter:
        commit_stream_state(model.lm, cache, row=cached - 1 - cached_before)
        crop_attention(cache, cached)
    else:
        crop_cache(cache, cached)


def _decode_one(model: TidarLM, prompt: list[int], cfg: TidarConfig, block_size: int, levels, use_cache: bool,
                gen: torch.Generator, keep_logits: bool) -> DecodeResult:
    """The step loop for one prompt (text left to the caller)."""
    from transformers import DynamicCache

    start_time = time.perf_counter()
    device = gen.device
    vocab = model.lm.get_output_embeddings().weight.shape[0]
    out = DecodeResult(prompt_ids=prompt, token_ids=[], forwards=0, accepted=[], drafts=[], wall_time_s=0.0,
                       stop="", step_logits=[] if keep_logits else None)
    seq = list(prompt)
    drafts, draft_logits, draft_q = [], torch.empty(0, vocab, device=device), torch.empty(0, vocab, device=device)
    cache = DynamicCache(config=model.config) if use_cache else None
    cached = 0
    while True:
        remaining = cfg.max_new_tokens - len(out.token_ids)
        drafted = step_levels(levels, len(drafts)) if remaining > 1 else ()  # the last token needs no template
        layout = build_step_layout(seq, drafts, drafted, block_size, model.mask_token_id, device=device)
        logits_RV, cache = step_forward(model, layout, cache, cached)
        k = len(drafts)
        a, t = verify(cfg, logits_RV[:k + 1], draft_logits, draft_q, drafts, gen)
        out.forwards += 1
        out.accepted.append(a)
        out.drafts.append(k)
        out.templates.append(len(drafted))
        if keep_logits:
            out.step_logits.append(logits_RV.float().cpu())
        seq += drafts[:a] + [t]
        out.token_ids, stop = finish(out.token_ids + drafts[:a] + [t], cfg.max_new_tokens, cfg.eos_ids())
        if stop is not None:
            out.stop, out.wall_time_s = stop, time.perf_counter() - start_time
            return out
        if cache is not None:
            cached_before, cached = cached, len(seq) - 1  # x_0..t_last of the next step; t is fed next step
            commit_cache(model, cache, cached_before, cached)
        level = level_for(a, drafted)
        if level is None:
            drafts, draft_logits, draft_q = [], draft_logits[:0], draft_q[:0]
            continue
        rows = next_draft_rows(level, a, block_size)
        offset = layout.templates[level] - layout.first
        room = cfg.max_new_tokens - len(out.token_ids) - 1  # drafts past max_new_tokens could never be kept
        draft_logits = logits_RV[offset + rows.start:offset + rows.stop][:room]
        draft_q = probs_from_logits(draft_logits, cfg.q_temperature, cfg.top_p)
        drafts = sample(draft_q, gen).tolist() if len(draft_logits) else []


def decode_tidar(model: TidarLM, prompts: Sequence[Sequence[int]], cfg: TidarConfig = TidarConfig(),
                 tokenizer=None, keep_logits: bool = False) -> list[DecodeResult]:
    """TiDAR decoding of each prompt (batch 1, one forward per step). See the module docstring.

    Returns one `DecodeResult` per prompt: generated ids (and text with a tokenizer), forwards (= steps), drafts
    accepted, drafts verified and templates drafted per step, wall time.
    """
    if not isinstance(model, TidarLM):
        raise TypeError(f"decode_tidar needs a TidarLM (ar2diff.model.TidarLM(lm, mask_token_id, block_size)), got "
                        f"{type(model).__name__}")
    block_size = model.block_size if cfg.block_size is None else cfg.block_size
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 (one mask for the next token, at least one draft), got {block_size}")
    levels = parse_levels(cfg.levels, block_size)
    use_cache = resolve_cache(model, cfg.use_cache)
    vocab = model.lm.get_input_embeddings().weight.shape[0]
    prompts = check_prompts(prompts, vocab, max_positions(model.config), cfg.max_new_tokens, extra_positions=block_size)
    device = model_device(model)
    results = []
    with inference(model):
        for i, prompt in enumerate(prompts):
            gen = torch.Generator(device=device).manual_seed(cfg.seed + i)
            result = _decode_one(model, prompt, cfg, block_size, levels, use_cache, gen, keep_logits)
            result.text = decode_text(tokenizer, result.token_ids)
            results.append(result)
    return results
