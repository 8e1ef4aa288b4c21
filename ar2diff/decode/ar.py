"""The AR baseline decoder: one forward per token, the model's own KV cache.

`decode_ar` is the reference TiDAR is measured against: it runs the unmodified transformers model exactly as
`generate` would (greedy at temperature 0 gives `lm.generate(do_sample=False)`'s tokens), with temperature and
top-p from `ar2diff.decode.samplers`. It uses the model's own cache class, so it covers every supported
architecture, ZAYA's convolution and value-shift states included. The types it returns are decode/common.py's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from ar2diff.decode.common import (  # noqa: F401
    DecodeConfig,
    DecodeResult,
    acceptance_histogram,
    check_prompts,
    decode_text,
    finish,
    inference,
    model_device,
    summarize,
)
from ar2diff.decode.samplers import probs_from_logits, sample
from ar2diff.model.loading import max_positions
from ar2diff.model.tidar import TidarLM


def decode_ar(model: nn.Module, prompts: Sequence[Sequence[int]], cfg: DecodeConfig = DecodeConfig(),
              tokenizer=None, keep_logits: bool = False) -> list[DecodeResult]:
    """AR decoding of each prompt (batch 1), one forward per generated token.

    model: a transformers causal LM, or a `TidarLM` (its `.lm` is used: the clean stream is the AR model).
    Returns one `DecodeResult` per prompt; accepted is all zeros (no drafts), forwards == tokens generated.
    """
    lm = model.lm if isinstance(model, TidarLM) else model
    vocab = lm.get_input_embeddings().weight.shape[0]
    prompts = check_prompts(prompts, vocab, max_positions(lm.config), cfg.max_new_tokens)
    use_cache = True if cfg.use_cache is None else cfg.use_cache
    device = model_device(lm)
    results = []
    with inference(lm):
        for i, prompt in enumerate(prompts):
            gen = torch.Generator(device=device).manual_seed(cfg.seed + i)
            start = time.perf_counter()
            new, logits_kept, cache, stop = [], [], None, None
            while stop is None:
                if use_cache:
                    step_ids = prompt if cache is None else new[-1:]
                    out = lm(input_ids=torch.tensor([step_ids], device=device), past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
                    cache = out.past_key_values
                else:
                    out = lm(input_ids=torch.tensor([prompt + new], device=device), use_cache=False, logits_to_keep=1)
                logits_V = out.logits[0, -1]
                if keep_logits:
                    logits_kept.append(logits_V[None].float().cpu())
                new.append(int(sample(probs_from_logits(logits_V, cfg.temperature, cfg.top_p), gen)))
                new, stop = finish(new, cfg.max_new_tokens, cfg.eos_ids())
            n = len(new)
            results.append(DecodeResult(prompt_ids=prompt, token_ids=new, forwards=n, accepted=[0] * n, drafts=[0] * n,
                                        templates=[0] * n, wall_time_s=time.perf_counter() - start, stop=stop,
                                        text=decode_text(tokenizer, new),
                                        step_logits=logits_kept if keep_logits else None))
    return results
