"""The quality half of the phase-end check: what `evaluation.phase_end.phase_end_eval` adds to eval.json.

- `base_relative`: the phase's checkpoint, its starting checkpoint and the pipeline's original base on one fixed
  pretraining held-out set (the pipeline's first non-chat data; a lone phase's own data), and for a chat phase
  (SFT) on its own chat held-out set as well;
- `passk`: pass@k of held-out continuations for the AR, lossless and mixing samplers, with each TiDAR sampler's
  paired difference to AR (lossless must be `consistent`), beside the decoder check's measured speedups;
- `position_loss` (context_extension only): held-out AR loss by position for the start and end checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ar2diff.data.loader import heldout_rows as read_rows
from ar2diff.evaluation.base_relative import compare, load_as_was, original_base
from ar2diff.evaluation.decoder_check import sampler_configs
from ar2diff.evaluation.heldout import read_heldout
from ar2diff.evaluation.passk import evaluate_passk
from ar2diff.evaluation.position import position_report


def previous_seq_len(start_dir) -> int | None:
    """The sequence length the starting checkpoint was trained at (its export's summary.json), if recorded."""
    path = Path(start_dir) / "summary.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("budget", {}).get("seq_len")


def out_of_domain_data(cfg):
    """The `DataConfig` of `decoder.quality.out_of_domain`: the phase's tokenizer and row length, plain text, and a
    held-out half (never trained on either way; two non-empty halves keep the split's cache files apart)."""
    return replace(cfg.data, sources=list(cfg.decoder.quality.out_of_domain), chat=False, heldout_fraction=0.5,
                   max_doc_tokens=None)


def reference_models(end_model, start_dir, device, dtype) -> dict:
    """{"end", "start", "base"} TidarObjectives; start and base loaded as they were (the base only when it differs)."""
    models = {"end": end_model}
    if start_dir is None or not Path(start_dir).is_dir():
        return models
    models["start"] = load_as_was(start_dir, dtype=dtype, device=device, alpha=end_model.alpha)
    base = original_base(start_dir)
    models["base"] = models["start"] if base.resolve() == Path(start_dir).resolve() else \
        load_as_was(base, dtype=dtype, device=device, alpha=end_model.alpha)
    return models


def phase_quality(*, cfg, end_model, heldout, samplers: dict, loss_rows: int, reference_data=None,
                  tokenizer=None) -> dict:
    """The three sections for one phase (those that apply); a JSON-ready dict merged into eval.json.

    heldout: the phase's own held-out split (a `PackedDataset`); reference_data: the `DataConfig` of the pipeline's
    fixed pretraining held-out set, read with `tokenizer` (None: the phase's own rows unless they are chat).
    samplers: the decoder check's per-sampler numbers.
    """

    q, dcfg = cfg.decoder.quality, cfg.decoder
    heldout_rows = read_heldout(heldout, max(loss_rows, q.reference_rows), q.passk_prompts if q.passk else 1,
                                dcfg.prompt_len + q.target_len)
    micro = cfg.deepspeed.micro_batch_size
    device = next(end_model.parameters()).device
    dtype = next(end_model.parameters()).dtype
    start_dir = cfg.model.path
    models = reference_models(end_model, start_dir, device, dtype) if q.base_relative else {"end": end_model}
    out = {"quality_start": str(start_dir) if start_dir else None,
           "quality_base": str(original_base(start_dir)) if start_dir and "base" in models else None}
    own = {k: v[:loss_rows] for k, v in heldout_rows.items()}
    reference_rows = None if cfg.data.chat else {k: v[:q.reference_rows] for k, v in heldout_rows.items()}
    if reference_data is not None and reference_data != cfg.data:
        reference_rows = read_rows(reference_data, tokenizer, q.reference_rows)
    sets = {}
    if reference_rows is not None:
        sets["pretrain"] = compare(models, reference_rows, micro, dcfg.seed, q.confidence)
    if cfg.data.chat:
        sets["chat"] = compare(models, own, micro, dcfg.seed, q.confidence)
    if q.out_of_domain:
        ood_rows = read_rows(out_of_domain_data(cfg), tokenizer, q.reference_rows)
        sets["out_of_domain"] = compare(models, ood_rows, micro, dcfg.seed, q.confidence)
    out["base_relative"] = sets

    if q.passk:
        block = end_model.model.block_size if dcfg.block_size is None else int(dcfg.block_size)
        cfgs = sampler_configs(replace(dcfg, max_new_tokens=q.target_len), None, block, q.passk_temperature)
        try:
            passk = evaluate_passk(end_model.model, heldout_rows, cfgs, num_prompts=q.passk_prompts,
                                   prompt_len=dcfg.prompt_len, target_len=q.target_len, samples=q.passk_samples,
                                   ks=q.passk_k, confidence=q.confidence, seed=dcfg.seed)
        except ValueError as err:
            raise ValueError(f"pass@k needs decoder.quality.passk_prompts={q.passk_prompts} document segments of "
                             f"decoder.prompt_len + decoder.quality.target_len = {dcfg.prompt_len + q.target_len} "
                             f"tokens: {err}") from None
        passk["speed"] = {name: {"tokens_per_forward": s["tokens_per_forward"], "speedup_wall": s["speedup_wall"],
                                 "mix_weight": s.get("mix_weight")} for name, s in samplers.items()}
        out["passk"] = passk

    if q.position_buckets and cfg.phase == "context_extension" and "start" in models:
        start = models["start"]
        limit = getattr(start.config, "max_position_embeddings", None)
        if limit is not None and limit < cfg.data.seq_len:  # RoPE as it was; only the length check is lifted
            start.config.max_position_embeddings = cfg.data.seq_len
        out["position_loss"] = position_report(start.model, end_model.model, own, micro, cfg.data.seq_len,
                                               previous_seq_len(start_dir))
    return out


def quality_metrics(result: dict) -> dict[str, float]:
    """The scalars to log (under `eval/`): deltas, scores, pass@k with intervals, bucketed losses."""
    out = {}
    for set_name, s in result.get("base_relative", {}).items():
        for model, sc in s["scores"].items():
            for key in ("loss_ar", "loss_diff"):
                out[f"base_relative/{set_name}/{model}/{key}"] = sc[key]
        for other in ("start", "base"):
            for key, v in s.get(f"delta_vs_{other}", {}).items():
                out[f"base_relative/{set_name}/delta_vs_{other}/{key}"] = v
            for key in ("low", "high"):
                if f"paired_vs_{other}" in s:
                    out[f"base_relative/{set_name}/delta_vs_{other}/loss_ar_{key}"] = s[f"paired_vs_{other}"][key]
    for name, s in result.get("passk", {}).get("samplers", {}).items():
        for key, v in s.items():
            if key.startswith("pass@"):
                out.update({f"passk/{name}/{key}": v["value"], f"passk/{name}/{key}_low": v["low"],
                            f"passk/{name}/{key}_high": v["high"]})
    for key in ("mean_delta_beyond", "mean_delta_within"):
        out[f"position_loss/{key}"] = result.get("position_loss", {}).get(key)
    for b in result.get("position_loss", {}).get("buckets", []):
        for key in ("loss_start", "loss_end", "delta"):
            out[f"position_loss/{b['start']}-{b['end']}/{key}"] = b[key]
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}
