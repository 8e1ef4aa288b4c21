"""One training phase, top to bottom: parts, budget, engine, resume, loop, checkpoint, export, phase-end callbacks.

The loop reads like the recipe: every optimizer step takes `grad_accum_steps` micro batches of this rank's rows,
each a TiDAR (or AR) forward through the DeepSpeed engine. The data position, tokens seen and RNG state are saved
with every checkpoint, so a resumed run sees exactly the batches, masks and numbers it would have seen.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from ar2diff.config.budget import Budget, plan_budget
from ar2diff.config.schema import PhaseConfig
from ar2diff.logging import RunLogger
from ar2diff.trainer.distributed import init_distributed
from ar2diff.trainer.setup import build_phase_model, resolve_tokenizer


@dataclass
class PhaseResult:
    run_dir: Path
    export_dir: Path | None
    summary: dict


def phase_budget(cfg: PhaseConfig, world_size: int) -> Budget:
    dp = world_size // max(1, cfg.deepspeed.sequence_parallel_size)
    return plan_budget(int(cfg.budget.tokens), cfg.data.seq_len, cfg.budget.global_batch_size,
                       cfg.deepspeed.micro_batch_size, dp)


def _seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _mean_over_ranks(values: dict[str, float], device) -> dict[str, float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: v / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def _prepare_data(cfg: PhaseConfig, tokenizer, rank: int, micro: int, dp_rank: int, dp_size: int):
    """Rank 0 tokenizes and packs (cached on disk); the others wait, then read the cache."""
    from ar2diff.data.loader import build_dataloaders, prepare_data
    from ar2diff.data.prepare import check_inline

    check_inline(cfg.data, tokenizer)  # every rank: data too large to prepare here fails before any rank waits
    if rank == 0:
        prepare_data(cfg.data, tokenizer)
    if dist.is_initialized():
        dist.barrier()
    return build_dataloaders(cfg.data, tokenizer, micro, dp_rank, dp_size)


def train_phase(cfg: PhaseConfig, run_dir: str | Path, group: str | None = None, callbacks=()) -> PhaseResult:
    """Train one phase into `run_dir` (checkpoints/, export/, summary.json, eval.json from callbacks)."""
    from ar2diff.checkpoint import load_checkpoint, save_checkpoint, save_run_assets
    from ar2diff.export import export_checkpoint
    from ar2diff.trainer.engine import build_engine, count_params, flops_per_token

    ctx = init_distributed()
    cfg.validate(ctx.world_size)
    run_dir = Path(run_dir)
    ckpt_root, export_dir = run_dir / "checkpoints", run_dir / "export"
    _seed_all(cfg.seed)

    tokenizer = resolve_tokenizer(cfg)
    model = build_phase_model(cfg, tokenizer)
    budget = phase_budget(cfg, ctx.world_size)
    logger = RunLogger(run_dir, ctx.rank, name=f"{cfg.name}:{cfg.phase}", group=group, config=asdict(cfg),
                       wandb_cfg=cfg.logger)
    logger.print(f"[{cfg.name}] phase {cfg.phase}: {budget.describe()}")
    params = count_params(model.lm)
    logger.print(f"[{cfg.name}] model {model.config.model_type}: {params.total:,} parameters"
                 + (f" ({params.active:,} active)" if params.active and params.active != params.total else ""))

    dp_size = budget.data_parallel_size
    dp_rank = ctx.rank // max(1, cfg.deepspeed.sequence_parallel_size)
    data = _prepare_data(cfg, tokenizer, ctx.rank, budget.micro_batch_size, dp_rank, dp_size)
    from ar2diff.data.loader import mixture_report

    logger.print(mixture_report(data.train.data, budget.tokens, cfg.data.max_repeats))
    engine_cfg = replace(cfg.deepspeed, grad_accum_steps=budget.grad_accum_steps)
    engine = build_engine(model, engine_cfg, cfg.schedule, budget.steps)

    run_meta = {"mask_token_id": model.mask_token_id, "block_size": model.block_size, "phase": cfg.phase,
                "recipe": cfg.name, "base_model": cfg.model.path or "scratch"}
    if ctx.rank == 0:
        save_run_assets(ckpt_root, model.config, tokenizer, run_meta)
    client = load_checkpoint(engine, ckpt_root)
    step, tokens_seen = 0, 0
    if client is not None:
        step, tokens_seen = int(client["step"]), int(client["tokens_seen"])
        data.train.load_state_dict(client["data"])
        logger.history = list(client.get("history", []))
        logger.print(f"[{cfg.name}] resumed from step {step} ({tokens_seen:,} tokens seen)")

    layout_len = cfg.data.seq_len * (2 if cfg.objective.kind == "tidar" else 1)
    flops_tok = flops_per_token(model.config, layout_len, params.matmul_active)
    device = engine.device
    window = {"t": time.time(), "tokens": 0, "sums": {}, "n": 0}
    ckpt_every = cfg.trainer.ckpt_every

    def save(at_step: int) -> None:
        client_state = {"step": at_step, "tokens_seen": tokens_seen, "data": data.train.state_dict(),
                        "history": logger.history}
        save_checkpoint(engine, ckpt_root, at_step, client_state, keep_last=cfg.trainer.keep_last)

    engine.train()
    while step < budget.steps:
        for micro in range(budget.grad_accum_steps):
            batch = {k: v.to(device) for k, v in next(data.train).items()}
            # the draft-mask RNG of the global micro batch: the same masks for any split over ranks and accumulation
            global_micro = dp_rank * budget.grad_accum_steps + micro
            gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 65_537 + global_micro)
            out = engine(input_ids=batch["input_ids"], doc_ids=batch["doc_ids"],
                         position_ids=batch["position_ids"], loss_mask=batch["loss_mask"], generator=gen)
            engine.backward(out.loss)
            engine.step()
            for k, v in out.terms.log_dict().items():
                window["sums"][k] = window["sums"].get(k, 0.0) + float(v)
            window["n"] += 1
        step += 1
        tokens_seen += budget.tokens_per_step
        window["tokens"] += budget.tokens_per_step
        if step % cfg.trainer.log_every == 0 or step == budget.steps:
            metrics = _mean_over_ranks({k: v / window["n"] for k, v in window["sums"].items()}, device)
            dt = time.time() - window["t"]
            metrics.update(lr=engine.get_lr()[0], tokens_per_s=window["tokens"] / dt, tokens_seen=tokens_seen,
                           step_seconds=dt / max(1, window["n"] / budget.grad_accum_steps))
            if cfg.trainer.peak_flops:
                layout_tokens_per_s = metrics["tokens_per_s"] * layout_len / cfg.data.seq_len
                metrics["mfu"] = layout_tokens_per_s * flops_tok / (cfg.trainer.peak_flops * ctx.world_size)
            logger.log(step, metrics)
            window = {"t": time.time(), "tokens": 0, "sums": {}, "n": 0}
        if step % ckpt_every == 0 and step < budget.steps:
            save(step)
    save(step)

    if ctx.rank == 0:
        export_checkpoint(ckpt_root, export_dir, extra_metadata={"tokens_seen": tokens_seen, "step": step})
    if dist.is_initialized():
        dist.barrier()
    logger.update_summary({"phase": cfg.phase, "recipe": cfg.name, "steps": step, "tokens_seen": tokens_seen,
                           "budget": asdict(budget), "data_stats": data.train.data.total_stats.to_dict(),
                           "export_dir": str(export_dir), "final": logger.history[-1] if logger.history else {}})
    engine.destroy()  # the phase-end checks load the export on their own; free the training state first
    del engine, model
    for callback in callbacks:
        callback(cfg=cfg, export_dir=export_dir, run_dir=run_dir, logger=logger, step=step, data=data,
                 tokenizer=tokenizer, rank=ctx.rank)
    logger.write_summary(run_dir / "summary.json")
    if ctx.rank == 0:
        logger.write_summary(export_dir / "summary.json")
    logger.finish()
    if dist.is_initialized():
        dist.barrier()  # every rank leaves the phase together, after rank 0's checks
    return PhaseResult(run_dir=run_dir, export_dir=export_dir, summary=logger.summary)
