"""The decoder check: held-out losses, then AR vs TiDAR decoding on prompts cut from the held-out split.

`evaluate_checkpoint` is a pure function of a model and held-out rows (`ar2diff.evaluation.phase_end` runs it on the
export at a phase's end), which measures

- held-out AR and diffusion loss (the training objective's terms, token-weighted over micro batches);
- per sampler (AR greedy baseline, TiDAR lossless, logit mixing at each weight), at the decode temperature:
  tokens per forward, the acceptance-length histogram, wall-clock tokens/s and speedup over AR in the same
  process, and agreement with AR (fraction of generated tokens equal position-wise, fraction of identical
  outputs; greedy lossless agrees exactly, so anything below 1.0 there is a bug);
- quality: the AR model's NLL per token of each sampler's output when sampling at temperature 1.0 (whatever the
  decode temperature: at temperature 0 every sampler's NLL would measure greedy text, not the distribution the
  sampler draws from), next to AR's NLL of its own samples. Lossless matches AR in distribution (a noise
  reference); mixing's excess NLL is its quality cost;
- a roofline projection (`ar2diff.decode.projection`) of the lossless and mixing speedups on MI300X, MI355X
  and H100 from the measured histograms, at batch 1 and `PROJECTION_CONTEXT` tokens of context, with the
  decoder's configured shape (block_size - 1 drafts, one template per drafted level: what a static-shape serving
  kernel allocates) and bf16 weights/KV.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ar2diff.config.schema import DecoderEvalConfig
from ar2diff.decode.agreement import agreement_curve
from ar2diff.decode.common import DecodeConfig, DecodeResult, inference, model_device, summarize
from ar2diff.decode.levels import phase_end_levels
from ar2diff.decode.metrics import decode_statistics
from ar2diff.decode.projection import ACCELERATORS, project_speedup
from ar2diff.decode.run import run_decoder
from ar2diff.decode.tidar import TidarConfig
from ar2diff.evaluation.heldout import heldout_losses, select_prompts
from ar2diff.model.params import ModelShape, model_shape
from ar2diff.model.router_balance import measure_router_load
from ar2diff.objective import TidarObjective

QUALITY_TEMPERATURE = 1.0
PROJECTION_CONTEXT = 4096


def agreement(reference: list[DecodeResult], other: list[DecodeResult]) -> tuple[float, float]:
    """(tokens equal position-wise / tokens of the longer output, fraction of prompts with identical output)."""
    same = sum(sum(a == b for a, b in zip(r.token_ids, o.token_ids)) for r, o in zip(reference, other))
    total = sum(max(len(r.token_ids), len(o.token_ids)) for r, o in zip(reference, other))
    identical = sum(r.token_ids == o.token_ids for r, o in zip(reference, other))
    return same / max(total, 1), identical / max(len(reference), 1)


def ar_nll(lm, results: list[DecodeResult]) -> tuple[float, int]:
    """(mean NLL per generated token under the AR model `lm`, tokens scored): each prompt + output in one forward."""
    total, count = 0.0, 0
    device = model_device(lm)
    with inference(lm):
        for r in results:
            ids = torch.tensor([r.prompt_ids + r.token_ids], device=device)
            logits_TV = lm(input_ids=ids, use_cache=False).logits[0, len(r.prompt_ids) - 1:-1].float()
            total += float(F.cross_entropy(logits_TV, ids[0, len(r.prompt_ids):], reduction="sum"))
            count += len(r.token_ids)
    return total / max(count, 1), count


def project(histogram: list[int], shape: ModelShape, block_size: int, num_templates: int) -> dict:
    """{accelerator: {speedup, tokens_per_forward, bound_ar, bound_tidar}} at batch 1, PROJECTION_CONTEXT."""
    out = {}
    for name, accel in ACCELERATORS.items():
        p = project_speedup(histogram, shape, accel, block_size, num_templates, batch=1, context=PROJECTION_CONTEXT,
                            num_drafts=block_size - 1)
        out[name] = {"speedup": p["speedup"], "tokens_per_forward": p["tokens_per_forward"],
                     "bound_ar": p["ar"]["bound"], "bound_tidar": p["tidar"]["bound"]}
    return out


def sampler_configs(dcfg: DecoderEvalConfig, eos_id, block_size: int, temperature: float) -> dict:
    """{sampler name: DecodeConfig (AR) or TidarConfig}: ar, lossless, mixing_<w> for every mix weight."""
    shared = dict(max_new_tokens=dcfg.max_new_tokens, temperature=temperature, top_p=dcfg.top_p,
                  eos_token_id=eos_id, seed=dcfg.seed)
    levels = "all" if dcfg.levels is None else tuple(int(x) for x in dcfg.levels)
    tidar = TidarConfig(**shared, block_size=block_size, levels=levels, sampler="lossless")
    cfgs = {"ar": DecodeConfig(**shared), "lossless": tidar}
    for w in dcfg.mix_weights:
        cfgs[f"mixing_{float(w):g}"] = replace(tidar, sampler="mixing", mix_weight=float(w))
    return cfgs


def warm_up(tidar_lm, prompts: list, cfgs: dict) -> None:
    """Decode a few tokens of the first prompt with every sampler (lazy init, allocator), so the first timed sampler
    pays nothing extra."""
    for cfg in cfgs.values():
        run_decoder(tidar_lm, prompts[:1], replace(cfg, max_new_tokens=min(4, cfg.max_new_tokens)))


def evaluate_checkpoint(objective: TidarObjective, heldout_rows: dict[str, torch.Tensor], dcfg: DecoderEvalConfig,
                        eos_id,
                        heldout_batches: int, micro_batch: int, tokenizer=None) -> dict:
    """The phase-end numbers for one model (see the module docstring); a JSON-ready dict, `eval.json`'s content.

    heldout_rows: (N, S) tensors input_ids/doc_ids/position_ids/loss_mask; the loss uses the first
    heldout_batches * micro_batch rows, prompts are cut from all N. eos_id: int, tuple or None (no EOS).
    With a tokenizer, the first two outputs of each sampler are kept as text. The held-out losses come from
    `objective`; the decoders run its model (`objective.model`).
    """
    tidar_lm = objective.model
    block_size = tidar_lm.block_size if dcfg.block_size is None else int(dcfg.block_size)
    loss_rows = {k: v[:heldout_batches * micro_batch] for k, v in heldout_rows.items()}
    heldout = heldout_losses(objective, loss_rows, micro_batch, seed=dcfg.seed)
    picks = select_prompts(heldout_rows, dcfg.num_prompts, dcfg.prompt_len)
    prompts = [heldout_rows["input_ids"][r, s:s + dcfg.prompt_len].tolist() for r, s in picks]

    cfgs = sampler_configs(dcfg, eos_id, block_size, dcfg.temperature)
    warm_up(tidar_lm, prompts, cfgs)
    results = {name: run_decoder(tidar_lm, prompts, cfg, tokenizer)  # a bar: the check takes minutes at scale
               for name, cfg in tqdm(cfgs.items(), desc="phase-end check: decoding", unit="sampler", leave=False)}
    ar_summary = summarize(results["ar"])
    shape = model_shape(tidar_lm.lm)
    num_templates = block_size if dcfg.levels is None else len(dcfg.levels)
    samplers = {}
    for name, res in results.items():
        s = summarize(res)
        cfg = cfgs[name]
        s["kind"] = cfg.sampler if isinstance(cfg, TidarConfig) else "ar"
        s["mix_weight"] = cfg.mix_weight if isinstance(cfg, TidarConfig) else None
        s["speedup_wall"] = s["tokens_per_s"] / ar_summary["tokens_per_s"] if ar_summary["tokens_per_s"] else 0.0
        s["agreement_tokens"], s["agreement_prompts"] = agreement(results["ar"], res)
        if s["kind"] != "ar":
            s["projection"] = project(s["acceptance_histogram"], shape, block_size, num_templates)
        if tokenizer is not None:
            s["samples"] = [r.text for r in res[:2]]
        samplers[name] = s

    quality_cfgs = sampler_configs(dcfg, eos_id, block_size, QUALITY_TEMPERATURE)
    nll, quality_results = {}, {}
    for name, cfg in quality_cfgs.items():
        res = results[name] if dcfg.temperature == QUALITY_TEMPERATURE else run_decoder(tidar_lm, prompts, cfg)
        nll[name], _ = ar_nll(tidar_lm.lm, res)
        quality_results[name] = res
    kinds = {name: s["kind"] for name, s in samplers.items()}
    statistics = {f"temperature_{t:g}": decode_statistics(res, kinds, block_size - 1, seed=dcfg.seed)
                  for t, res in ((dcfg.temperature, results), (QUALITY_TEMPERATURE, quality_results))}
    quality = {"temperature": QUALITY_TEMPERATURE, "top_p": dcfg.top_p, "nll_per_token": nll,
               "nll_excess_over_ar": {k: v - nll["ar"] for k, v in nll.items() if k != "ar"}}
    return {
        "settings": {**asdict(dcfg), "block_size": block_size, "levels": dcfg.levels or "all", "eos_token_id": eos_id,
                     "projection": {"batch": 1, "context": PROJECTION_CONTEXT, "num_drafts": block_size - 1,
                                    "num_templates": num_templates, "shape": asdict(shape)}},
        "heldout": heldout,
        "prompts": {"count": len(prompts), "prompt_len": dcfg.prompt_len,
                    "rows_scanned": len(heldout_rows["input_ids"]), "picks": [list(p) for p in picks]},
        "samplers": samplers,
        "quality": quality,
        "router_load": measure_router_load(tidar_lm.lm, loss_rows["input_ids"], micro_batch),  # {} if dense
        "statistics": statistics,  # TPF intervals, repetition, mixing - lossless (ar2diff.decode.metrics)
        "agreement_curve": agreement_curve(objective, loss_rows, micro_batch, seed=dcfg.seed),
        "levels_auto": phase_end_levels(samplers, statistics[f"temperature_{dcfg.temperature:g}"], shape, block_size,
                                        PROJECTION_CONTEXT),  # `--levels auto` per preset vs all and Zyphra's
    }
