"""The phase-end decoder check: held-out losses, then AR vs TiDAR decoding on prompts cut from the held-out split.

`phase_end_eval` is the trainer callback (rank 0 only): it loads the exported checkpoint as a bare transformers
model (no DeepSpeed), wraps it in `TidarLM` and calls `evaluate_checkpoint`, a pure function of a model and
held-out rows, which measures

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

`write_eval` writes `eval.json` (atomically) and one acceptance-histogram PNG per TiDAR sampler into each folder.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ar2diff.config.schema import DecoderEvalConfig
from ar2diff.decode.agreement import agreement_curve
from ar2diff.decode.ar import decode_ar
from ar2diff.decode.common import (DecodeConfig, DecodeResult, eos_of, inference,  # noqa: F401 (eos_of re-exported)
                                   model_device, summarize)
from ar2diff.decode.levels import phase_end_levels
from ar2diff.decode.metrics import decode_statistics, flat_statistics
from ar2diff.decode.projection import ACCELERATORS, ModelShape, project_speedup
from ar2diff.decode.tidar import TidarConfig, decode_tidar
from ar2diff.fs import write_json_atomic
from ar2diff.model.params import NUM_EXPERTS_KEYS, total_and_expert_params
from ar2diff.model.router_balance import flatten, measure_router_load
from ar2diff.model.tidar import TidarLM
from ar2diff.objective import TidarObjective

QUALITY_TEMPERATURE = 1.0
PROJECTION_CONTEXT = 4096


# --- held-out rows: losses and prompts ---------------------------------------------------------------------------
def heldout_losses(model: TidarObjective, rows: dict[str, torch.Tensor], micro_batch: int, seed: int = 0) -> dict:
    """Token-weighted mean AR / diffusion / router losses of `model.forward` over `rows` in micro batches (no grad).

    The draft mask (random only for mask_ratio < 1) comes from a generator seeded with `seed`, so the numbers
    repeat. `loss` is the hybrid objective (alpha from the model) without the router term.
    """
    n_rows = rows["input_ids"].shape[0]
    if n_rows == 0:
        raise ValueError("no held-out rows to evaluate: raise data.heldout_fraction (or add held-out data)")
    device = model_device(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    sums = {"ar": 0.0, "diff": 0.0, "aux": 0.0, "n_ar": 0, "n_diff": 0, "batches": 0}
    with inference(model):
        for start in range(0, n_rows, micro_batch):
            batch = {k: v[start:start + micro_batch].to(device) for k, v in rows.items()}
            terms = model(batch["input_ids"], batch["doc_ids"], batch["position_ids"], batch["loss_mask"],
                          generator=gen).terms
            sums["ar"] += float(terms.ar) * terms.n_ar
            sums["diff"] += float(terms.diff) * terms.n_diff
            sums["aux"] += float(terms.aux)
            sums["n_ar"] += terms.n_ar
            sums["n_diff"] += terms.n_diff
            sums["batches"] += 1
    ar = sums["ar"] / sums["n_ar"] if sums["n_ar"] else 0.0
    diff = sums["diff"] / sums["n_diff"] if sums["n_diff"] else 0.0
    return {"rows": n_rows, "batches": sums["batches"], "tokens": int(rows["input_ids"].numel()),
            "tokens_ar": sums["n_ar"], "tokens_diff": sums["n_diff"], "loss_ar": ar, "loss_diff": diff,
            "loss": (model.alpha * ar + diff) / (1 + model.alpha), "loss_aux": sums["aux"] / sums["batches"]}


def prompt_segments(doc_ids_NS: torch.Tensor, prompt_len: int) -> list[list[int]]:
    """Per row, the start of every document segment (a run of one doc id >= 0) of at least prompt_len tokens."""
    out = []
    for row in doc_ids_NS.tolist():
        starts, i = [], 0
        while i < len(row):
            j = i
            while j < len(row) and row[j] == row[i]:
                j += 1
            if row[i] >= 0 and j - i >= prompt_len:
                starts.append(i)
            i = j
        out.append(starts)
    return out


def select_prompts(rows: dict[str, torch.Tensor], num_prompts: int, prompt_len: int) -> list[tuple[int, int]]:
    """(row, start) of `num_prompts` prompts: the first prompt_len tokens of document segments, taken round-robin
    over rows (each row's first segment, then each row's second, ...) so prompts come from as many rows as possible.
    Deterministic; segments shorter than prompt_len are skipped."""
    per_row = prompt_segments(rows["doc_ids"], prompt_len)
    picks = [(r, starts[k]) for k in range(max(map(len, per_row), default=0))
             for r, starts in enumerate(per_row) if k < len(starts)]
    if len(picks) < num_prompts:
        raise ValueError(f"the held-out split has {len(picks)} document segments of >= decoder.prompt_len="
                         f"{prompt_len} tokens in {len(per_row)} rows, fewer than decoder.num_prompts={num_prompts}; "
                         "lower decoder.prompt_len or decoder.num_prompts, or raise data.heldout_fraction")
    return picks[:num_prompts]


def read_heldout(heldout, loss_rows: int, num_prompts: int, prompt_len: int) -> dict[str, torch.Tensor]:
    """Leading rows of a `PackedDataset`: at least `loss_rows` (when there are that many) and enough to cut
    `num_prompts` prompts from (doubling the read until they are found or the split is exhausted)."""
    total = len(heldout)
    if total == 0:
        raise ValueError("the held-out split is empty: raise data.heldout_fraction (or add held-out data)")
    n = min(total, max(loss_rows, num_prompts, 1))
    while True:
        rows = heldout.rows(range(n))
        found = sum(map(len, prompt_segments(rows["doc_ids"], prompt_len)))
        if found >= num_prompts or n == total:
            return rows
        n = min(total, 2 * n)


# --- decoding metrics --------------------------------------------------------------------------------------------
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


def model_shape(lm) -> ModelShape:
    """The projection's model shape from a transformers config and its parameters (bf16 weights and KV).

    Routed expert weights are the parameters under an `.experts.` module; a token uses top_k / num_experts of them.
    """
    config = lm.config
    total, expert = total_and_expert_params(lm)
    num_experts = next((getattr(config, k) for k in NUM_EXPERTS_KEYS if getattr(config, k, None)), 1)
    top_k = getattr(config, "num_experts_per_tok", None) or 1
    routed = expert > 0 and num_experts > top_k
    active = total - expert + expert * top_k / num_experts if routed else total
    heads = config.num_attention_heads
    return ModelShape(total_params=float(total), active_params=float(active), num_layers=config.num_hidden_layers,
                      hidden_size=config.hidden_size, num_kv_heads=getattr(config, "num_key_value_heads", heads),
                      head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                      num_query_heads=heads, num_experts=num_experts if routed else 1,
                      experts_per_token=top_k if routed else 1)


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


def run_decoder(model: TidarLM, prompts: list[list[int]], cfg: DecodeConfig, tokenizer=None) -> list[DecodeResult]:
    if isinstance(cfg, TidarConfig):
        return decode_tidar(model, prompts, cfg, tokenizer=tokenizer)
    return decode_ar(model, prompts, cfg, tokenizer=tokenizer)


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
    for cfg in cfgs.values():  # warm-up (lazy init, allocator) so the first timed sampler pays nothing extra
        run_decoder(tidar_lm, prompts[:1], replace(cfg, max_new_tokens=min(4, dcfg.max_new_tokens)))
    from tqdm import tqdm

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


# --- outputs -----------------------------------------------------------------------------------------------------
def flat_metrics(result: dict) -> dict[str, float]:
    """The scalars to log (under the `eval/` prefix): held-out losses, per-sampler decode numbers, NLLs, projections."""
    h = result["heldout"]
    out = {f"heldout/{k}": h[k] for k in ("loss", "loss_ar", "loss_diff", "loss_aux", "tokens_ar", "tokens_diff")}
    for name, s in result["samplers"].items():
        for key in ("tokens_per_forward", "tokens_per_s", "speedup_wall", "agreement_tokens", "agreement_prompts"):
            out[f"{name}/{key}"] = s[key]
        for accel, p in s.get("projection", {}).items():
            out[f"{name}/projected_speedup/{accel.replace(' ', '_')}"] = p["speedup"]
    for name, v in result["quality"]["nll_per_token"].items():
        out[f"{name}/nll_t1"] = v
    out.update({f"router/{k}": v for k, v in flatten(result.get("router_load", {})).items()})
    for temp, stats in result.get("statistics", {}).items():
        out.update(flat_statistics(stats, temp))
    curve = result.get("agreement_curve", {})
    for key, value in curve.get("mean_over_drafts", {}).items():
        out[f"agreement_curve/{key}"] = value
    for key, (low, high) in curve.get("mean_over_drafts_interval", {}).items():
        out[f"agreement_curve/{key}_low"], out[f"agreement_curve/{key}_high"] = low, high
    for name, per_hw in result.get("levels_auto", {}).items():
        for hw, r in per_hw.items():
            for which, entry in r.items():
                out[f"{name}/levels_auto/{hw}/{which}_speedup"] = entry["speedup"]

    from ar2diff.evaluation.phase_quality import quality_metrics  # base-relative, pass@k, loss by position

    out.update(quality_metrics(result))
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def summary_subset(result: dict) -> dict:
    """What goes into summary.json under "eval": losses, and per sampler TPF, speedup, agreement, MI300X projection."""
    h, s = result["heldout"], result["samplers"]
    return {"loss_ar": h["loss_ar"], "loss_diff": h["loss_diff"],
            "tokens_per_forward": {k: v["tokens_per_forward"] for k, v in s.items()},
            "speedup_wall": {k: v["speedup_wall"] for k, v in s.items()},
            "agreement_tokens": {k: v["agreement_tokens"] for k, v in s.items()},
            "projected_speedup_MI300X": {k: v["projection"]["MI300X"]["speedup"] for k, v in s.items()
                                         if "projection" in v},
            "nll_excess_over_ar": result["quality"]["nll_excess_over_ar"],
            "tokens_per_forward_ci": {temp: {k: [v["tpf"]["low"], v["tpf"]["high"]] for k, v in st["samplers"].items()}
                                      for temp, st in result.get("statistics", {}).items()}}


def write_eval(result: dict, folders, logger=None, step: int = 0) -> list[Path]:
    """Write eval.json (atomic) and acceptance_<sampler>.png per TiDAR sampler into every folder; with a logger,
    log the scalars (prefix "eval"), the images of the first folder and the summary subset. Returns the json paths."""
    from ar2diff.decode.plots import save_acceptance_histogram, save_router_load, save_statistics_figures

    try:
        import matplotlib  # noqa: F401  (optional: pip install ar2diff[plot])
        plots = True
    except ImportError:
        plots = False
        if logger is not None:
            logger.print("[eval] matplotlib is not installed: no acceptance-histogram PNGs (pip install matplotlib)")
    paths, images = [], {}
    for folder in map(Path, folders):
        write_json_atomic(folder / "eval.json", result)
        paths.append(folder / "eval.json")
        for name, s in result["samplers"].items():
            if plots and s["kind"] != "ar":
                png = save_acceptance_histogram(s["acceptance_histogram"], folder / f"acceptance_{name}.png",
                                                title=f"{name}: {s['tokens_per_forward']:.2f} tokens/forward")
                images.setdefault(name, png)
        if plots and result.get("router_load"):
            images.setdefault("router_load", save_router_load(result["router_load"], folder / "router_load.png",
                                                              title="expert load of the routers' choices (held-out)"))
        if plots:  # TPF intervals and the teacher-forced agreement curve (ar2diff.decode.metrics / agreement)
            for name, png in save_statistics_figures(result, folder).items():
                images.setdefault(name, png)
    if logger is not None:
        logger.log(step, flat_metrics(result), prefix="eval")
        for name, png in images.items():
            logger.log_image(f"eval/acceptance/{name}" if name in result["samplers"] else f"eval/{name}", png, step)
        logger.update_summary({"eval": summary_subset(result)})
    return paths


def load_exported(export_dir, dtype=torch.float32, device=None) -> TidarLM:
    """A `TidarLM` around the exported transformers model (eval mode); see ar2diff.checkpoint.reader.load_export."""
    from ar2diff.checkpoint.reader import load_export

    return load_export(export_dir, dtype=dtype, device=device, with_tokenizer=False).tidar()


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def phase_end_eval(*, cfg, export_dir, run_dir, logger, step, data, tokenizer, rank, reference_data=None,
                   **_) -> dict | None:
    """Trainer callback: evaluate the exported checkpoint on rank 0 (other ranks return None at once), write
    eval.json into export_dir and run_dir, log the numbers. Returns the result dict on rank 0.
    reference_data: the pipeline's fixed pretraining held-out set for the base-relative losses (None: own data)."""
    if rank != 0:
        return None
    start = time.perf_counter()
    dcfg, o = cfg.decoder, cfg.objective
    model = TidarObjective(load_exported(export_dir, dtype=getattr(torch, cfg.model.dtype), device=default_device()),
                           alpha=o.alpha, mask_ratio=o.mask_ratio, aux_coef=o.aux_coef)
    heldout_batches, micro = cfg.trainer.heldout_batches, cfg.deepspeed.micro_batch_size
    rows = read_heldout(data.heldout, heldout_batches * micro, dcfg.num_prompts, dcfg.prompt_len)
    result = evaluate_checkpoint(model, rows, dcfg, eos_of(model.lm, tokenizer), heldout_batches, micro,
                                 tokenizer=tokenizer)
    if dcfg.quality.enabled:  # base-relative losses, pass@k, loss by position (ar2diff.evaluation)
        from ar2diff.evaluation.phase_quality import phase_quality

        result.update(phase_quality(cfg=cfg, end_model=model, heldout=data.heldout, samplers=result["samplers"],
                                    loss_rows=heldout_batches * micro, reference_data=reference_data,
                                    tokenizer=tokenizer))
    result.update(step=step, phase=cfg.phase, recipe=cfg.name, export_dir=str(export_dir),
                  eval_seconds=time.perf_counter() - start)
    write_eval(result, [export_dir, run_dir], logger, step)
    for temp, stats in result["statistics"].items():
        for note in stats["notes"]:
            logger.print(f"[eval] {temp}: {note}")

    from ar2diff.evaluation.report import write_phase_plots

    for png in write_phase_plots(result, [run_dir]):
        logger.log_image(f"eval/{png.stem}", png, step)
    logger.print(f"[eval] {len(result['samplers'])} samplers on {result['prompts']['count']} prompts in "
                 f"{result['eval_seconds']:.1f} s; eval.json in {export_dir} and {run_dir}")
    return result
