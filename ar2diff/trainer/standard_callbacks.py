"""The built-in callbacks of every phase: metrics and MFU, held-out eval, checkpoints, export, the decoder check,
summary.json, the progress bar. Each owns one concern; `PhaseTrainer` installs them (see trainer/callbacks.py for
the hooks and their order)."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from ar2diff.trainer.callbacks import Callback, TrainState
from ar2diff.trainer.sequence_parallel import reduce_logged
from ar2diff.evaluation.heldout import heldout_losses, read_heldout
from ar2diff.checkpoint.resume import save_checkpoint
from ar2diff.checkpoint.export import export_checkpoint
from ar2diff.evaluation.phase_end import phase_end_eval
from tqdm.auto import tqdm


def mean_over_ranks(values: dict[str, float], device) -> dict[str, float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: v / dist.get_world_size() for k, v in zip(keys, t.tolist())}


class Metrics(Callback):
    """Train losses averaged over the micro batches of a logging window and over ranks; lr, tokens/s, MFU."""

    order = -20

    def __init__(self, flops_per_token, layout_len: int, density):
        """flops_per_token(attention_length) -> training FLOPs per layout token; `density` (a trainer.mfu.DensityWindow)
        measures the mask of every micro batch, so attention is counted over the pairs actually computed."""
        self.flops_per_token, self.layout_len, self.density = flops_per_token, layout_len, density
        self._reset()

    def on_batch(self, state: TrainState, batch: dict) -> dict:
        self.density.add(batch["doc_ids"], batch["position_ids"])
        return batch

    def _reset(self) -> None:
        self.t, self.tokens, self.sums, self.n = time.time(), 0, {}, 0

    def on_micro_step_end(self, state: TrainState, out) -> None:
        for k, v in out.terms.log_dict().items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1

    def on_step_end(self, state: TrainState) -> None:
        cfg, budget = state.cfg, state.budget
        self.tokens += budget.tokens_per_step
        if not (state.step % cfg.trainer.log_every == 0 or state.step == budget.steps):
            return
        window = {k: v / self.n for k, v in self.sums.items()}
        # under sequence parallelism each rank's terms are shares of its rows: summed over the group first
        metrics = mean_over_ranks(reduce_logged(window, state.objective.sequence_parallel, state.device),
                                   state.device)
        dt = time.time() - self.t
        metrics.update(lr=state.engine.get_lr()[0], tokens_per_s=self.tokens / dt, tokens_seen=state.tokens_seen,
                       step_seconds=dt / max(1, self.n / budget.grad_accum_steps))
        metrics.update(self.density.take())
        if cfg.trainer.peak_flops:
            layout_tokens_per_s = metrics["tokens_per_s"] * self.layout_len / cfg.data.seq_len
            flops_tok = self.flops_per_token(self.layout_len * metrics["attn_compute_density"])
            metrics["mfu"] = layout_tokens_per_s * flops_tok / (cfg.trainer.peak_flops * state.world_size)
        state.logger.log(state.step, metrics)
        state.extra["last_metrics"] = metrics
        self._reset()


class HeldoutEval(Callback):
    """`trainer.eval_every`: held-out AR and diffusion losses during the phase (every rank takes part: ZeRO-3 gathers
    parameters in the forward). Reads the same leading held-out rows each time and draws no training randomness."""

    order = -10

    def on_phase_start(self, state: TrainState) -> None:
        if state.cfg.trainer.eval_every and len(state.data.heldout) == 0:
            raise ValueError(f"trainer.eval_every={state.cfg.trainer.eval_every} but the held-out split is empty: "
                             "raise data.heldout_fraction or set trainer.eval_every=0")

    def on_step_end(self, state: TrainState) -> None:
        every = state.cfg.trainer.eval_every
        if not every or state.step % every:
            return

        micro = state.cfg.deepspeed.micro_batch_size
        rows = read_heldout(state.data.heldout, state.cfg.trainer.heldout_batches * micro, 0, 1)
        rows = {k: v[:state.cfg.trainer.heldout_batches * micro] for k, v in rows.items()}
        result = heldout_losses(state.objective, rows, micro, seed=state.cfg.decoder.seed)
        state.logger.log(state.step, {k: result[k] for k in ("loss", "loss_ar", "loss_diff", "loss_aux")},
                         prefix="heldout")


class Checkpointing(Callback):
    """A checkpoint every `trainer.ckpt_every` steps, when a callback asks (`should_save`/`should_stop`), and at the
    end. Data position, tokens seen and the log history travel in the client state, so resume is exact."""

    order = 10

    def save(self, state: TrainState) -> None:
        client_state = {"step": state.step, "tokens_seen": state.tokens_seen, "data": state.data.train.state_dict(),
                        "history": state.logger.history,
                        **{key: obj.state_dict() for key, obj in state.checkpointed.items()}}
        save_checkpoint(state.engine, state.ckpt_root, state.step, client_state, keep_last=state.cfg.trainer.keep_last)
        state.extra["last_saved_step"] = state.step

    def on_step_end(self, state: TrainState) -> None:
        periodic = state.step % state.cfg.trainer.ckpt_every == 0 and state.step < state.budget.steps
        if periodic or state.should_save or state.should_stop:
            self.save(state)
            state.should_save = False

    def on_phase_end(self, state: TrainState) -> None:
        if state.extra.get("last_saved_step") != state.step:
            self.save(state)


class Export(Callback):
    """Rank 0 writes the transformers export of the final checkpoint (not for a phase that stopped early)."""

    order = 20

    def on_phase_end(self, state: TrainState) -> None:
        if state.stopped_early:
            state.logger.print(f"[{state.cfg.name}] stopped at step {state.step}: checkpoint saved, no export")
            return
        if state.rank == 0:
            export_checkpoint(state.ckpt_root, state.export_dir,
                              extra_metadata={"tokens_seen": state.tokens_seen, "step": state.step})
        if dist.is_initialized():
            dist.barrier()
        state.logger.update_summary({
            "phase": state.cfg.phase, "recipe": state.cfg.name, "steps": state.step, "tokens_seen": state.tokens_seen,
            "budget": asdict(state.budget), "data_stats": state.data.train.data.total_stats.to_dict(),
            "export_dir": str(state.export_dir), "final": state.logger.history[-1] if state.logger.history else {}})


class ReleaseEngine(Callback):
    """Free the training state (engine, optimizer, ZeRO buffers): the phase-end checks load the export on their own."""

    order = 30

    def on_phase_end(self, state: TrainState) -> None:
        state.engine.destroy()
        state.extra["engine_released"] = True


class DecoderCheck(Callback):
    """The phase-end decoder check (decode/evaluate.py's `phase_end_eval`) on the export, rank 0 only."""

    order = 40

    def __init__(self, reference_data=None):
        self.reference_data = reference_data  # DataConfig of the pipeline's fixed pretraining held-out set, or None

    def on_phase_end(self, state: TrainState) -> None:
        if state.stopped_early:
            return

        state.logger.print(f"[eval] phase-end decoder check on {state.export_dir} ...")
        state.extra["eval"] = phase_end_eval(cfg=state.cfg, export_dir=state.export_dir, run_dir=state.run_dir,
                                             logger=state.logger, step=state.step, data=state.data,
                                             tokenizer=state.tokenizer, rank=state.rank,
                                             reference_data=self.reference_data)


class Summary(Callback):
    """summary.json in the run folder (and in the export), W&B finished; every rank leaves the phase together."""

    order = 50

    def on_phase_end(self, state: TrainState) -> None:
        state.logger.write_summary(state.run_dir / "summary.json")
        if state.rank == 0 and not state.stopped_early:
            state.logger.write_summary(state.export_dir / "summary.json")
        state.logger.finish()
        if dist.is_initialized():
            dist.barrier()  # every rank leaves the phase together, after rank 0's checks

    def on_close(self, state: TrainState) -> None:
        state.logger.close()  # W&B finished (as failed) when the phase stopped on an error


class ProgressBar(Callback):
    """Rank 0's tqdm bar over optimizer steps: tokens seen, this rank's last loss, tokens/s; tqdm gives the ETA."""

    order = 60

    def __init__(self):
        self.bar = None

    def on_phase_start(self, state: TrainState) -> None:
        if state.rank != 0 or not state.cfg.trainer.progress_bar:
            return

        self.bar = tqdm(total=state.budget.steps, initial=state.step, desc=f"{state.cfg.phase}", unit="step",
                        file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
        self.t, self.tokens = time.time(), state.tokens_seen

    def on_step_end(self, state: TrainState) -> None:
        if self.bar is None:
            return
        loss = sum(float(t.loss.detach()) for t in state.step_terms) / max(1, len(state.step_terms))
        rate = (state.tokens_seen - self.tokens) / max(1e-9, time.time() - self.t)
        self.bar.set_postfix(tokens=f"{state.tokens_seen:,}", loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
        self.bar.update(1)

    def on_close(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.close()
