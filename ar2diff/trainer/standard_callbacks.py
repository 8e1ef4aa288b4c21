"""The built-in callbacks of every phase: metrics and MFU, held-out eval, the progress bar. Each owns one concern;
`PhaseTrainer` installs them (see trainer/callbacks.py for the hooks and their order). Checkpoints and the end of
a phase (export, decoder check, summary) are the trainer's own code (trainer/phase.py)."""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ar2diff.evaluation.heldout import heldout_losses, read_heldout
from ar2diff.trainer.callbacks import Callback, TrainState
from ar2diff.model.sequence_shard import reduce_logged


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
