"""An lm-eval-harness model for ar2diff exports: loglikelihood from the AR stream, generation through a TiDAR sampler.

`Ar2diffLM` implements lm-eval's `LM` interface (`pip install ar2diff[lm_eval]`):

- `loglikelihood` / `loglikelihood_rolling` score with the model's causal (AR) forward, `TidarLM.causal_logits`,
  exactly what `transformers` computes on the export (the ZAYA stream adapter is a no-op there);
- `generate_until` decodes with the chosen ar2diff sampler: `ar` (the AR baseline), `lossless` (same distribution
  as AR, fewer forwards) or `mixing` with a weight; greedy unless the task's gen_kwargs sample. Stop sequences
  cut the text afterwards (decoding runs to EOS or max_gen_toks), so tokens per forward is the decoder's own.

`run_tasks` runs tasks one at a time through `lm_eval.simple_evaluate` and reports, per task, lm-eval's metrics
and the tokens per forward of that task's generations (None for loglikelihood-only tasks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ar2diff.data.tokenizer import load_tokenizer
from ar2diff.decode.ar import DecodeConfig
from ar2diff.decode.run import run_decoder
from ar2diff.decode.tidar import TidarConfig
from ar2diff.evaluation.base_relative import load_as_was

SAMPLERS = ("ar", "lossless", "mixing")


@dataclass
class GenerationStats:
    """Generated tokens and forwards of every `generate_until` request since the last reset."""

    tokens: int = 0
    forwards: int = 0
    requests: int = 0

    @property
    def tokens_per_forward(self) -> float | None:
        return self.tokens / self.forwards if self.forwards else None


@register_model("ar2diff")
class Ar2diffLM(LM):
    """lm-eval model over a `TidarLM` (or, for sampler="ar", an AR-only one) and its tokenizer."""

    def __init__(self, model, tokenizer, sampler: str = "lossless", mix_weight: float = 0.0,
                 max_gen_toks: int = 256, max_length: int | None = None, seed: int = 0, levels="all"):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"--sampler {sampler!r} must be one of {SAMPLERS}")
        if sampler != "ar" and model.mask_token_id is None:
            raise ValueError(f"--sampler {sampler} needs a diffusion export (ar2diff.json names a mask token); this "
                             "checkpoint is AR-only: use --sampler ar")
        if sampler == "mixing" and not 0 < mix_weight <= 1:
            raise ValueError(f"--mix-weight {mix_weight} must lie in (0, 1] for --sampler mixing")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.sampler, self.mix_weight, self.levels = sampler, float(mix_weight), levels
        self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)
        self.max_length = int(max_length or getattr(model.config, "max_position_embeddings", None) or 2048)
        self.stats = GenerationStats()

    @classmethod
    def from_export(cls, path, dtype=torch.float32, device=None, **kwargs) -> "Ar2diffLM":
        """Load an export folder (or a plain transformers folder with a tokenizer) as it was exported."""

        return cls(load_as_was(path, dtype=dtype, device=device).model, load_tokenizer(path), **kwargs)

    # --- helpers -------------------------------------------------------------------------------------------------
    @property
    def device(self):
        return next(self.model.parameters()).device

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prefix_token(self) -> int:
        """The token an empty context starts from: BOS, else EOS."""
        tok = self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id if tok is None else tok

    @torch.no_grad()
    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """(sum of log p(continuation | context), whether greedy decoding would produce it), AR stream."""
        ids = (context + continuation)[-(self.max_length + 1):]
        n = len(continuation)
        input_ids = torch.tensor([ids[:-1]], device=self.device)
        logits_TV = self.model.causal_logits(input_ids)[0, -n:].float()
        target = torch.tensor(ids[-n:], device=self.device)
        logprobs = F.log_softmax(logits_TV, dim=-1)
        return float(logprobs.gather(1, target[:, None]).sum()), bool((logits_TV.argmax(-1) == target).all())

    # --- lm-eval interface ---------------------------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            ctx = self.encode(context) if context else [self.prefix_token()]
            out.append(self.score(ctx, self.encode(continuation)))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in requests:
            windows = map(make_disjoint_window, get_rolling_token_windows(
                self.encode(req.args[0]), self.prefix_token(), self.max_length, context_len=1))
            out.append(sum(self.score(ctx, cont)[0] for ctx, cont in windows))
        return out

    def decode_config(self, max_new_tokens: int, temperature: float, top_p: float, seed: int):

        shared = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                      eos_token_id=self.tokenizer.eos_token_id)
        if self.sampler == "ar":
            return DecodeConfig(**shared)
        return TidarConfig(**shared, levels=self.levels, sampler=self.sampler,
                           mix_weight=self.mix_weight if self.sampler == "mixing" else 0.0)

    def generate_until(self, requests) -> list[str]:
        out = []
        for i, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            cfg = self.decode_config(int(kwargs.get("max_gen_toks", self.max_gen_toks)), temperature,
                                     float(kwargs.get("top_p", 1.0)), self.seed + i)
            room = self.max_length - cfg.max_new_tokens - (0 if self.sampler == "ar" else self.model.block_size)
            prompt = (self.encode(context) or [self.prefix_token()])[-room:]  # keep the end of a long context
            result = run_decoder(self.model, [prompt], cfg)[0]
            self.stats.tokens += len(result.token_ids)
            self.stats.forwards += result.forwards
            self.stats.requests += 1
            ids = [t for t in result.token_ids if t != self.tokenizer.eos_token_id]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out


def run_tasks(lm: Ar2diffLM, tasks: list[str], include_path=None, limit: int | None = None,
              num_fewshot: int | None = None, include_defaults: bool = True) -> dict:
    """{task: {"metrics": lm-eval's numbers, "tokens_per_forward", "generations"}} plus the sampler settings.

    include_defaults=False indexes only include_path's tasks (lm-eval's own index takes ~50 s to build)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=include_defaults or not include_path)
    report = {"sampler": lm.sampler, "mix_weight": lm.mix_weight if lm.sampler == "mixing" else None, "tasks": {}}
    for task in tasks:
        lm.stats = GenerationStats()
        res = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                              log_samples=False, bootstrap_iters=0)
        for name, metrics in res["results"].items():
            report["tasks"][name] = {"metrics": {k: v for k, v in metrics.items() if k != "alias"},
                                     "tokens_per_forward": lm.stats.tokens_per_forward,
                                     "generations": lm.stats.requests}
    return report
