"""`PhaseTrainer`: one training phase. Setup (parts, budget, data, engine, resume), the loop, then `finish`.

Every optimizer step takes `grad_accum_steps` micro batches of this rank's rows, each a forward of the
`TidarObjective` through the DeepSpeed engine; a checkpoint follows every `trainer.ckpt_every` steps and every step
a callback asks for, and every `trainer.export_every` steps an intermediate export with its light check. The end of
a phase is plain code, `finish`: final checkpoint, export, engine released, decoder check, summary, with the stop
signal read between those steps; set-up and the checks are `interruptible` (a signal abandons them at once, nothing
half-written), an export runs to its end. What is pluggable (metrics and MFU, held-out eval,
the non-finite guard, the preemption check, router balancing, the progress bar) is a callback (trainer/callbacks.py
for the hooks, trainer/standard_callbacks.py for the built-ins). The data position, tokens seen, RNG state and the
router's controller are saved with every checkpoint (`TrainState.state_dict`), so a resumed run sees exactly the
batches, masks and numbers it would have seen.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from ar2diff.checkpoint.export import export_checkpoint
from ar2diff.checkpoint.export_layout import save_run_assets
from ar2diff.evaluation.light_check import light_check, light_metrics
from ar2diff.checkpoint.resume import find_latest_complete, load_checkpoint, save_checkpoint
from ar2diff.config.budget import Budget, plan_budget
from ar2diff.config.schema import PhaseConfig
from ar2diff.data.loader import build_dataloaders
from ar2diff.data.loader import prepare_data as prepare
from ar2diff.data.prepare import check_inline
from ar2diff.data.report import report_sources
from ar2diff.data.tokenizer import resolve_tokenizer
from ar2diff.dtypes import cpu_bf16
from ar2diff.evaluation.phase_end import phase_end_eval
from ar2diff.logging import RunLogger
from ar2diff.model.params import count_params
from ar2diff.model.router_balance import RouterBalancer
from ar2diff.plan.fits import check_plan_fits, device_capacity
from ar2diff.trainer import standard_callbacks as std
from ar2diff.trainer.callbacks import Callback, Callbacks, TrainState
from ar2diff.trainer.distributed import init_distributed, rank0_wait_group, wait_for_rank0
from ar2diff.trainer.engine import build_engine, flops_per_token
from ar2diff.trainer.fault_callbacks import NonFiniteStop, PreemptionStop
from ar2diff.export_format import is_complete_export, read_metadata
from ar2diff.trainer.faults import Preempted, StopRequested, process_stop
from ar2diff.trainer.mfu import DensityWindow
from ar2diff.trainer.resume_config import check_resume_config
from ar2diff.trainer.router_callback import RouterBalancing
from ar2diff.trainer.sequence_parallel import loss_scale
from ar2diff.trainer.setup import build_phase_model


@dataclass
class PhaseResult:
    run_dir: Path
    export_dir: Path | None
    summary: dict


def phase_budget(cfg: PhaseConfig, world_size: int) -> Budget:
    dp = world_size // max(1, cfg.deepspeed.sequence_parallel_size)
    return plan_budget(int(cfg.budget.tokens), cfg.data.seq_len, cfg.budget.global_batch_size,
                       cfg.deepspeed.micro_batch_size, dp)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_data(cfg: PhaseConfig, tokenizer, rank: int, micro: int, dp_rank: int, dp_size: int):
    """Rank 0 tokenizes and packs (cached on disk); the others wait, then read the cache."""

    check_inline(cfg.data, tokenizer)  # every rank: data too large to prepare here fails before any rank waits
    if rank == 0:
        prepare(cfg.data, tokenizer)
    wait_for_rank0(cfg.trainer.rank0_timeout_minutes)
    return build_dataloaders(cfg.data, tokenizer, micro, dp_rank, dp_size)


class PhaseTrainer:
    """Train one phase into `run_dir` (checkpoints/, export/, summary.json; eval.json from the decoder check).

    `callbacks` are added to the built-ins (`default_callbacks`); `decoder_check` runs the decoder check on the
    export in `finish`."""

    def __init__(self, cfg: PhaseConfig, run_dir: str | Path, group: str | None = None,
                 callbacks: list[Callback] = (), decoder_check: bool = False, reference_data=None):
        self.cfg, self.run_dir, self.group = cfg, Path(run_dir), group
        self.extra_callbacks, self.decoder_check = list(callbacks), decoder_check
        self.reference_data = reference_data  # the pipeline's fixed pretraining held-out set (base-relative quality)
        # SIGTERM/SIGUSR1/SIGINT: the process's one handler (the command line installs it at start; `run` too)
        self.signal = process_stop()

    def setup(self) -> TrainState:
        """Tokenizer, objective-with-model, data, DeepSpeed engine; restores the newest complete checkpoint."""

        cfg, ctx = self.cfg, init_distributed(self.cfg.trainer.collective_timeout_minutes,
                                                 self.cfg.trainer.rank0_timeout_minutes)
        cfg.validate(ctx.world_size)
        # a resume must not silently change the schedule or the data (trainer.allow_config_change=true to allow)
        check_resume_config(self.run_dir, asdict(cfg), resuming=find_latest_complete(self.run_dir / "checkpoints")
                            is not None, allow_change=cfg.trainer.allow_config_change, write=ctx.rank == 0)
        if cfg.trainer.memory_plan_check and (device := device_capacity()) is not None:
            check_plan_fits(cfg, ctx.world_size, *device)  # before any model is built or data prepared
        seed_all(cfg.seed)
        tokenizer = resolve_tokenizer(cfg)
        objective = build_phase_model(cfg, tokenizer)
        budget = phase_budget(cfg, ctx.world_size)
        logger = RunLogger(self.run_dir, ctx.rank, name=f"{cfg.name}:{cfg.phase}", group=self.group,
                           config=asdict(cfg), wandb_cfg=cfg.logger)
        logger.print(f"[{cfg.name}] phase {cfg.phase}: {budget.describe()}")
        if ctx.world_size > 1:
            t = cfg.trainer
            logger.print(f"[{cfg.name}] a collective waits {t.collective_timeout_minutes:g} min for a peer "
                         f"(trainer.collective_timeout_minutes), {t.rank0_timeout_minutes:g} min for rank 0's export and "
                         "checks (trainer.rank0_timeout_minutes); then the run fails naming the wait")
        if get_accelerator().device_name() == "cpu":  # which dtype pays on this CPU (deepspeed.precision)
            logger.print(f"[{cfg.name}] {cpu_bf16()[1]}; deepspeed.precision={cfg.deepspeed.precision}")
        params = count_params(objective.lm)
        logger.print(f"[{cfg.name}] model {objective.config.model_type}: {params.total:,} parameters"
                     + (f" ({params.active:,} active)" if params.active and params.active != params.total else ""))
        dp_rank = ctx.rank // max(1, cfg.deepspeed.sequence_parallel_size)
        state = TrainState(cfg=cfg, run_dir=self.run_dir, rank=ctx.rank, world_size=ctx.world_size,
                           dp_rank=dp_rank, budget=budget, tokenizer=tokenizer, logger=logger,
                           export_dir=self.run_dir / "export")
        state.data = prepare_data(cfg, tokenizer, ctx.rank, budget.micro_batch_size, dp_rank,
                                  budget.data_parallel_size)
        report_sources(state.data.train.data, state.data.heldout, budget.steps * cfg.budget.global_batch_size,
                       cfg.data.max_repeats, logger.print, ctx.rank)
        engine_cfg = replace(cfg.deepspeed, grad_accum_steps=budget.grad_accum_steps)
        state.engine = build_engine(objective, engine_cfg, cfg.schedule, budget.steps)
        self.params = params
        # sequence parallelism: each rank's loss share, scaled so DeepSpeed's reduction gives the unsharded gradient
        self.loss_scale = loss_scale(engine_cfg.zero_stage, engine_cfg.reduce_scatter,
                                     engine_cfg.sequence_parallel_size)

        model = objective.model
        run_meta = {"mask_token_id": model.mask_token_id, "block_size": model.block_size, "phase": cfg.phase,
                    "recipe": cfg.name, "base_model": cfg.model.path or "scratch"}
        if ctx.rank == 0:
            save_run_assets(state.ckpt_root, model.config, tokenizer, run_meta)
        client = load_checkpoint(state.engine, state.ckpt_root, start_over=cfg.trainer.start_over)
        # after the weights are loaded: the controller keeps its own fp32 copy of ZAYA's biases
        state.checkpointed["router_balance"] = RouterBalancer(state.lm, cfg.router_balance)
        if client is not None:
            state.load_state_dict(client)
            logger.print(f"[{cfg.name}] resumed from step {state.step} ({state.tokens_seen:,} tokens seen)")
        return state

    def default_callbacks(self, state: TrainState) -> list[Callback]:
        cfg = self.cfg
        layout_len = cfg.data.seq_len * (2 if cfg.objective.kind == "tidar" else 1)
        matmul_active = self.params.matmul_active
        # attention FLOPs over the (query, key) pairs the kernel computes for the mask actually used (trainer/mfu.py)
        density = DensityWindow(cfg.objective.kind, cfg.objective.block_size, cfg.model.attn_implementation)
        metrics = std.Metrics(lambda attn_len: flops_per_token(state.lm.config, attn_len, matmul_active), layout_len,
                              density)
        return [metrics, std.HeldoutEval(), std.ProgressBar(), NonFiniteStop(cfg.trainer.max_nonfinite_skips),
                PreemptionStop(self.signal), RouterBalancing(state.checkpointed["router_balance"])]

    def train_step(self, state: TrainState, callbacks: Callback) -> None:
        """One optimizer step: `grad_accum_steps` micro batches, forward + backward + engine step each."""
        engine, accum = state.engine, state.budget.grad_accum_steps
        state.step_terms = []
        for micro in range(accum):
            batch = {k: v.to(state.device) for k, v in next(state.data.train).items()}
            batch = callbacks.on_batch(state, batch)
            # the draft-mask RNG of the global micro batch: the same masks for any split over ranks and accumulation
            global_micro = state.dp_rank * accum + micro
            gen = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + state.step) * 65_537 + global_micro)
            out = engine(input_ids=batch["input_ids"], doc_ids=batch["doc_ids"], position_ids=batch["position_ids"],
                         loss_mask=batch["loss_mask"], generator=gen)
            engine.backward(out.loss * self.loss_scale)
            engine.step()
            state.step_terms.append(out.terms)
            callbacks.on_micro_step_end(state, out)

    def save(self, state: TrainState) -> None:
        """A checkpoint of this step (every rank): the engine's files plus `state.state_dict()`."""
        save_checkpoint(state.engine, state.ckpt_root, state.step, state.state_dict(),
                        keep_last=self.cfg.trainer.keep_last)
        state.last_saved_step = state.step

    def run(self) -> PhaseResult:
        self.signal.install()
        try:
            with self.signal.interruptible():  # a signal during set-up stops it at once (StopRequested)
                state = self.setup()
            callbacks = Callbacks([*self.default_callbacks(state), *self.extra_callbacks])
            try:
                callbacks.on_phase_start(state)
                state.engine.train()
                while state.step < state.budget.steps and not state.should_stop:
                    self.train_step(state, callbacks)
                    state.step += 1
                    state.tokens_seen += state.budget.tokens_per_step
                    callbacks.on_step_end(state)
                    periodic = state.step % self.cfg.trainer.ckpt_every == 0 and state.step < state.budget.steps
                    export = self.export_due(state)
                    if periodic or export or state.should_save or state.should_stop:
                        self.save(state)
                        state.should_save = False
                    if export and not state.should_stop:
                        self.intermediate_export(state)
                state.stopped_early = state.step < state.budget.steps
                self.finish(state)
            finally:
                callbacks.on_close(state)
                state.logger.close()  # W&B finished (as failed) when the phase stopped on an error
        finally:
            self.signal.uninstall()
        if state.stopped_by is not None:  # checkpoint written: the caller exits 0 and a requeue resumes
            raise Preempted(state.step, state.stopped_by)
        export_dir = None if state.stopped_early else state.export_dir
        return PhaseResult(run_dir=self.run_dir, export_dir=export_dir, summary=state.logger.summary)

    def export_due(self, state: TrainState) -> bool:
        every = self.cfg.trainer.export_every
        return every > 0 and state.step % every == 0 and state.step < state.budget.steps

    def intermediate_export(self, state: TrainState) -> None:
        """Export the checkpoint just saved to run_dir/exports/step_<N> and, with the decoder check on, give it the
        light check (rank 0; the others wait). A re-run that passes this step again re-exports it."""
        folder = state.run_dir / "exports" / f"step_{state.step:06d}"
        if state.rank == 0:
            export_checkpoint(state.ckpt_root, folder,
                              extra_metadata={"tokens_seen": state.tokens_seen, "step": state.step},
                              verify=False)  # just saved (and hashed) by this run
            if self.decoder_check:
                try:  # a signal abandons the light check; the checkpoint of this step is already written
                    with torch.random.fork_rng(devices=[]), self.signal.interruptible():
                        result = light_check(cfg=self.cfg, export_dir=folder, heldout=state.data.heldout,
                                             tokenizer=state.tokenizer, device=state.device)
                    state.logger.log(state.step, light_metrics(result), prefix="light")
                except StopRequested as stop:
                    state.logger.print(f"[{self.cfg.name}] {stop} during the light check of {folder}: abandoned")
        if self.stop_requested(state, state.device, wait=True):  # every rank: a signal during the export or check
            state.should_stop = True

    def stop_requested(self, state: TrainState, device, wait: bool = False) -> bool:
        """Whether a stop signal reached any rank (collective: every rank calls it at the same point). wait: the
        other ranks may be waiting on rank 0's checks here (trainer.rank0_timeout_minutes)."""
        group = rank0_wait_group(self.cfg.trainer.rank0_timeout_minutes) if wait else None
        if state.stopped_by is None and self.signal.should_stop(device, group=group):
            state.stopped_by = self.signal.name
        return state.stopped_by is not None

    @staticmethod
    def exported(state: TrainState) -> bool:
        """Whether export/ already holds this step's complete export (a re-run after a stop during the check)."""
        return is_complete_export(state.export_dir) and read_metadata(state.export_dir).get("step") == state.step

    def finish(self, state: TrainState) -> None:
        """The end of a phase, in order. A stop signal read between the steps skips what is left but the summary,
        which records the phase as "stopped" (a re-run resumes and does the rest)."""
        cfg, device = self.cfg, state.device
        if state.last_saved_step != state.step:  # 1. the final checkpoint
            self.save(state)
        if state.stopped_early:
            state.logger.print(f"[{cfg.name}] stopped at step {state.step}: checkpoint saved, no export")
        elif not self.stop_requested(state, device):  # 2. the export (rank 0; the others wait); a signal lets it end
            if state.rank == 0 and not self.exported(state):
                export_checkpoint(state.ckpt_root, state.export_dir,
                                  extra_metadata={"tokens_seen": state.tokens_seen, "step": state.step},
                                  verify=False)  # saved (hashed) or verified at resume by this run
            wait_for_rank0(cfg.trainer.rank0_timeout_minutes)
        state.engine.destroy()  # 3. free the training state: the checks load the export on their own
        if self.decoder_check and not state.stopped_early and not self.stop_requested(state, device):
            try:  # 4. (rank 0) a signal abandons it: eval.json is written last, so a re-run does it again
                with self.signal.interruptible():
                    state.logger.print(f"[eval] phase-end decoder check on {state.export_dir} ...")
                    phase_end_eval(cfg=cfg, export_dir=state.export_dir, run_dir=state.run_dir, logger=state.logger,
                                   step=state.step, data=state.data, tokenizer=state.tokenizer, rank=state.rank,
                                   reference_data=self.reference_data)
            except StopRequested as stop:
                state.logger.print(f"[{cfg.name}] {stop} during the decoder check: abandoned; re-run to check")
            self.stop_requested(state, device, wait=True)  # every rank learns of a signal rank 0 got meanwhile
        self.write_summary(state)  # 5.

    def write_summary(self, state: TrainState) -> None:
        """summary.json in the run folder (and in the export), W&B finished; every rank leaves the phase together."""
        status = "stopped" if state.stopped_early or state.stopped_by else "complete"
        state.logger.update_summary({
            "phase": self.cfg.phase, "recipe": self.cfg.name, "status": status, "steps": state.step,
            "tokens_seen": state.tokens_seen, "budget": asdict(state.budget),
            "data_stats": state.data.train.data.total_stats.to_dict(),
            "export_dir": str(state.export_dir) if status == "complete" else None,
            "final": state.logger.history[-1] if state.logger.history else {}})
        state.logger.write_summary(state.run_dir / "summary.json")
        if state.rank == 0 and status == "complete":
            state.logger.write_summary(state.export_dir / "summary.json")
        state.logger.finish()
        if dist.is_initialized():
            dist.barrier()  # every rank leaves the phase together, after rank 0's checks
