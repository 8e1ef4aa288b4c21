"""The light check of an intermediate export (`trainer.export_every`): what the drafter has learned so far, in
seconds to a minute, so a run's TPF and speed can be followed against the tokens it has trained on.

On the phase's held-out split: the AR and diffusion losses, the teacher-forced agreement by draft offset
(`ar2diff.decode.agreement`), and greedy lossless decoding against greedy AR on `decoder.light_prompts` prompts
(tokens per forward with its interval over prompts, wall-clock tokens/s of both in this process, whether lossless
reproduced AR). The full panel (`phase_end.phase_end_eval`) runs once, at the phase's end.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from ar2diff.checkpoint.reader import load_export
from ar2diff.decode.agreement import agreement_curve
from ar2diff.decode.common import eos_of, summarize
from ar2diff.decode.metrics import tpf_interval
from ar2diff.decode.run import run_decoder
from ar2diff.evaluation.decoder_check import agreement, sampler_configs, warm_up
from ar2diff.evaluation.heldout import heldout_losses, read_heldout, select_prompts
from ar2diff.export_format import read_metadata
from ar2diff.fs import write_json_atomic
from ar2diff.objective import TidarObjective

LIGHT_EVAL = "light_eval.json"


def light_check(*, cfg, export_dir, heldout, tokenizer, device=None, out_dir=None) -> dict:
    """The numbers above for the export in `export_dir` (loaded in the phase's dtype); written to light_eval.json in
    `out_dir` (default: the export folder) and returned. heldout: the phase's held-out `PackedDataset`."""
    start = time.perf_counter()
    dcfg, o = cfg.decoder, cfg.objective
    lm = load_export(export_dir, dtype=getattr(torch, cfg.model.dtype), device=device, with_tokenizer=False).tidar()
    model = TidarObjective(lm, alpha=o.alpha, mask_ratio=o.mask_ratio, aux_coef=o.aux_coef)
    micro, n_loss = cfg.deepspeed.micro_batch_size, cfg.trainer.heldout_batches * cfg.deepspeed.micro_batch_size
    rows = read_heldout(heldout, n_loss, dcfg.light_prompts, dcfg.prompt_len)
    loss_rows = {k: v[:n_loss] for k, v in rows.items()}
    losses = heldout_losses(model, loss_rows, micro, seed=dcfg.seed)
    curve = agreement_curve(model, loss_rows, micro, seed=dcfg.seed)
    prompts = [rows["input_ids"][r, s:s + dcfg.prompt_len].tolist()
               for r, s in select_prompts(rows, dcfg.light_prompts, dcfg.prompt_len)]
    block = lm.block_size if dcfg.block_size is None else int(dcfg.block_size)
    cfgs = sampler_configs(replace(dcfg, mix_weights=[]), eos_of(lm.lm, tokenizer), block, temperature=0.0)
    warm_up(lm, prompts, cfgs)
    results = {name: run_decoder(lm, prompts, c) for name, c in cfgs.items()}
    ar, lossless = summarize(results["ar"]), summarize(results["lossless"])
    tpf = tpf_interval(results["lossless"], confidence=dcfg.quality.confidence, seed=dcfg.seed)
    meta = read_metadata(export_dir)
    out = {
        "step": meta.get("step"), "tokens_seen": meta.get("tokens_seen"),
        "phase": cfg.phase, "export_dir": str(export_dir),
        "heldout": {"loss_ar": losses["loss_ar"], "loss_diff": losses["loss_diff"], "rows": losses["rows"]},
        "agreement_by_offset": {k: curve[k] for k in ("argmax_agree", "expected_accept", "data_hit",
                                                       "mean_over_drafts", "mean_over_drafts_interval")},
        "greedy": {"prompts": len(prompts), "max_new_tokens": dcfg.max_new_tokens, "levels": dcfg.levels,
                   "tokens_per_forward": tpf, "acceptance_histogram": lossless["acceptance_histogram"],
                   "tokens_per_s": {"ar": ar["tokens_per_s"], "lossless": lossless["tokens_per_s"]},
                   "speedup_wall": lossless["tokens_per_s"] / ar["tokens_per_s"] if ar["tokens_per_s"] else 0.0,
                   "agreement_tokens": agreement(results["ar"], results["lossless"])[0]},
        "dtype": cfg.model.dtype, "threads": torch.get_num_threads(), "seconds": time.perf_counter() - start,
    }
    write_json_atomic(Path(out_dir or export_dir) / LIGHT_EVAL, out)
    return out


def light_metrics(result: dict) -> dict[str, float]:
    """The scalars to log (under `light/`)."""
    g = result["greedy"]
    return {"loss_ar": result["heldout"]["loss_ar"], "loss_diff": result["heldout"]["loss_diff"],
            "tokens_per_forward": g["tokens_per_forward"]["tokens_per_forward"],
            "tokens_per_forward_low": g["tokens_per_forward"]["low"],
            "tokens_per_forward_high": g["tokens_per_forward"]["high"], "speedup_wall": g["speedup_wall"],
            "agreement_tokens": g["agreement_tokens"],
            "argmax_agree_mean": result["agreement_by_offset"]["mean_over_drafts"].get("argmax_agree", 0.0)}
