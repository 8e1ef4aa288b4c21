"""The phase-end check, the one entry that reads the phase config: load the export as a bare transformers model (no
DeepSpeed), run the decoder check (`decoder_check.evaluate_checkpoint`) and, when enabled, the quality panel
(`phase_quality`: base-relative losses, pass@k, loss by position), then write eval.json and the plots."""

from __future__ import annotations

import time

import torch

from ar2diff.checkpoint.reader import load_export
from ar2diff.decode.common import eos_of
from ar2diff.evaluation.decoder_check import evaluate_checkpoint
from ar2diff.evaluation.eval_json import write_eval
from ar2diff.evaluation.heldout import read_heldout
from ar2diff.evaluation.phase_quality import phase_quality
from ar2diff.evaluation.report import write_phase_plots
from ar2diff.model.tidar import TidarLM
from ar2diff.objective import TidarObjective


def load_exported(export_dir, dtype=torch.float32, device=None) -> TidarLM:
    """A `TidarLM` around the exported transformers model (eval mode); see ar2diff.checkpoint.reader.load_export."""
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
        result.update(phase_quality(cfg=cfg, end_model=model, heldout=data.heldout, samplers=result["samplers"],
                                    loss_rows=heldout_batches * micro, reference_data=reference_data,
                                    tokenizer=tokenizer))
    result.update(step=step, phase=cfg.phase, recipe=cfg.name, export_dir=str(export_dir),
                  eval_seconds=time.perf_counter() - start)
    write_eval(result, [export_dir, run_dir], logger, step)
    for temp, stats in result["statistics"].items():
        for note in stats["notes"]:
            logger.print(f"[eval] {temp}: {note}")

    for png in write_phase_plots(result, [run_dir]):
        logger.log_image(f"eval/{png.stem}", png, step)
    logger.print(f"[eval] {len(result['samplers'])} samplers on {result['prompts']['count']} prompts in "
                 f"{result['eval_seconds']:.1f} s; eval.json in {export_dir} and {run_dir}")
    return result
