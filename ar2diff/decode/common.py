"""What both decoders (decode/ar.py, decode/tidar.py) share: `DecodeConfig` (the settings), `DecodeResult` (the
per-prompt record: tokens, text, forwards, drafts accepted per forward, wall time), `summarize` (the numbers the
phase-end evaluation logs: tokens per forward, acceptance-length histogram, tokens per second), prompt checks,
stopping, the EOS lookup and the no-grad eval-mode context."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class DecodeConfig:
    """Settings shared by the AR and TiDAR decoders.

    temperature 0 is greedy. eos_token_id: one id or several (generation stops after the first one emitted, which
    is kept), None for no EOS. seed: prompt i uses a generator seeded with seed + i, so a prompt's output does not
    depend on the other prompts. use_cache: None = the KV cache wherever it is exact; False recomputes the whole
    sequence every forward (the reference the cache is tested against).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    eos_token_id: int | tuple[int, ...] | None = None
    seed: int = 0
    use_cache: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filtering), got {self.top_p!r}")

    def eos_ids(self) -> frozenset[int]:
        if self.eos_token_id is None:
            return frozenset()
        if isinstance(self.eos_token_id, int):
            return frozenset({self.eos_token_id})
        return frozenset(int(i) for i in self.eos_token_id)


@dataclass
class DecodeResult:
    """One prompt's decode. token_ids are the generated ids only (EOS included when it stopped generation).

    accepted[i]: drafts accepted by forward i (0 for every AR forward); drafts[i]: drafts it verified;
    templates[i]: mask blocks it drafted (forward i fed drafts[i] + 1 + templates[i] * block_size new tokens).
    The last forward may commit more tokens than max_new_tokens allows; they are cut, so tokens_per_forward
    (generated tokens / forwards) can be a little below mean(accepted) + 1.
    step_logits: per forward, the logits of the rows the step uses (AR: the last position, (1, V); TiDAR: t_last,
    the drafts and the templates, (R, V)); only with keep_logits=True.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    forwards: int
    accepted: list[int]
    drafts: list[int]
    wall_time_s: float
    stop: str  # "eos" | "max_new_tokens"
    templates: list[int] = field(default_factory=list)
    text: str | None = None
    step_logits: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / self.forwards

    def to_json(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "token_ids": self.token_ids, "text": self.text,
                "forwards": self.forwards, "accepted": self.accepted, "drafts": self.drafts,
                "templates": self.templates, "tokens_per_forward": self.tokens_per_forward,
                "wall_time_s": self.wall_time_s, "stop": self.stop}


def acceptance_histogram(results: Sequence[DecodeResult]) -> list[int]:
    """counts[n] = forwards that accepted n drafts, over all results (the input of `projection.project_speedup`)."""
    lengths = [a for r in results for a in r.accepted]
    counts = [0] * (max(lengths, default=0) + 1)
    for a in lengths:
        counts[a] += 1
    return counts


def summarize(results: Sequence[DecodeResult]) -> dict:
    """Totals over prompts: tokens, forwards, tokens per forward, acceptance histogram, mean drafts and templates
    per forward (what `projection.project_speedup` takes as num_drafts / num_templates), wall time, tokens/s."""
    tokens = sum(len(r.token_ids) for r in results)
    forwards = sum(r.forwards for r in results)
    wall = sum(r.wall_time_s for r in results)

    def per_forward(values: int) -> float:
        return values / forwards if forwards else 0.0

    return {"prompts": len(results), "tokens": tokens, "forwards": forwards, "tokens_per_forward": per_forward(tokens),
            "acceptance_histogram": acceptance_histogram(results),
            "drafts_per_forward": per_forward(sum(sum(r.drafts) for r in results)),
            "templates_per_forward": per_forward(sum(sum(r.templates) for r in results)),
            "wall_time_s": wall, "tokens_per_s": tokens / wall if wall > 0 else 0.0}


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, context: int | None, max_new_tokens: int,
                  extra_positions: int = 0) -> list[list[int]]:
    """Prompts as lists of ints, each non-empty, in the vocabulary, and short enough for the context.

    A decode feeds positions up to len(prompt) + max_new_tokens - 2 (+ extra_positions for TiDAR's templates),
    which must stay below the model's max_position_embeddings (`context`).
    """
    out = []
    if len(prompts) == 0:
        raise ValueError("no prompts given: pass a list of token-id lists")
    for i, prompt in enumerate(prompts):
        ids = [int(t) for t in (prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt)]
        if not ids:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}) (range [{min(ids)}, {max(ids)}]): "
                             "the tokenizer does not match the model")
        needed = len(ids) + max_new_tokens - 1 + extra_positions
        if context is not None and needed > context:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens}"
                + (f" and {extra_positions} positions for the draft templates" if extra_positions else "")
                + f" the decoder needs {needed} positions but the model's context (max_position_embeddings) is "
                f"{context}: shorten the prompt or lower max_new_tokens")
        out.append(ids)
    return out


@contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout: decoding must be exact) and no autograd; restores the training flag after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def finish(new_ids: list[int], max_new_tokens: int, eos: frozenset[int]) -> tuple[list[int], str | None]:
    """Generated ids cut at the first EOS (kept) or at max_new_tokens; the stop reason, None to go on."""
    for i, t in enumerate(new_ids[:max_new_tokens]):
        if t in eos:
            return new_ids[:i + 1], "eos"
    if len(new_ids) >= max_new_tokens:
        return new_ids[:max_new_tokens], "max_new_tokens"
    return new_ids, None


def decode_text(tokenizer, token_ids: list[int]) -> str | None:
    return None if tokenizer is None else tokenizer.decode(token_ids, skip_special_tokens=True)


def eos_of(lm, tokenizer=None):
    """The EOS id(s) generation stops at: the generation config's, else the model config's, else the tokenizer's."""
    gen = getattr(lm, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    eos = eos if eos is not None else getattr(lm.config, "eos_token_id", None)
    eos = eos if eos is not None or tokenizer is None else tokenizer.eos_token_id
    return tuple(eos) if isinstance(eos, list) else eos
