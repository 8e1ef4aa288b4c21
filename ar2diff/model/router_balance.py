"""Router load: what the routers actually choose, and the bias controller that balances ZAYA's.

ZAYA (transformers `ZayaRouter`) picks the top-1 class of `softmax(router_logits) + balancing_biases` over E experts
plus one skip class, and nothing in transformers updates the biases. `RouterBalancer` does, after every optimizer
step, from the load over the global batch (ZAYA1 report: a PID-controller-inspired update run by AdamW; DeepSeek-V3:
`b += u * sign(error)`). Settings and the skip-class treatment: `ar2diff.config.router.RouterBalanceConfig`.

- Recording: forward hooks on the unmodified router modules. For ZAYA the hook recomputes the biased top-k from the
  logits the router returns and its current biases (the very arithmetic of `ZayaRouter.forward`, so the recorded
  class is the one the router took, skip included; the returned indices hide the skip class). For the other MoE
  routers (`*TopKRouter`: Qwen3-MoE, Mixtral, OLMoE) the returned indices are the choice. Only forwards in training
  mode count. An activation-checkpointing recompute records the same choices again; shares are unchanged by that.
  Every routed position counts (both TiDAR streams; packing padding too).
- Balancing: the per-class counts of one optimizer step are summed over the process group (data- and sequence-
  parallel ranks: together they route every token of the global batch once), so every rank applies the same
  update and two ranks equal one. error = target share - measured share (positive = under-loaded, raise the bias).
- Metrics per layer: max_load / min_load (an expert's share as a multiple of the uniform share), load_ratio
  (max/min, a zero-token expert counted as one token), load_entropy (of the expert shares, / log E: 1 = uniform),
  skip_share (ZAYA). They are computed over the tokens of a logging window. step_max_load / step_min_load: the same
  extremes per optimizer step, averaged over the window's steps. The two differ when the load is balanced only in
  time: a router whose probabilities barely vary across tokens (tiny ZAYA's last layer after 245 steps: per-token
  std ~1e-3) is steered wholesale by biases that move ~update_rate a step, so each step one expert takes nearly
  every token, and a different one the next step. The window's shares look uniform, the per-step ones do not.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ar2diff.config.router import RouterBalanceConfig


def find_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every router: ZAYA's (a `balancing_biases` buffer) and transformers' `*TopKRouter`s."""
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "balancing_biases") or type(m).__name__.endswith("TopKRouter")]


def num_classes(router: nn.Module) -> int:
    return router.balancing_biases.numel() if hasattr(router, "balancing_biases") else router.num_experts


def biased_choice(router: nn.Module, router_logits: torch.Tensor) -> torch.Tensor:
    """The classes ZAYA's router takes: top-k of softmax(logits) + biases, as `ZayaRouter.forward` computes it."""
    probs = torch.softmax(router_logits, dim=-1).detach().to(torch.float32) + router.balancing_biases
    return torch.topk(probs, router.top_k, dim=-1).indices


class LoadRecorder:
    """Per-router class counts of the training forwards (every forward with training_only=False) since the last
    `take()` (hooks on the routers)."""

    def __init__(self, model: nn.Module, training_only: bool = True):
        self.training_only = training_only
        self.routers = find_routers(model)
        self.counts: list[torch.Tensor | None] = [None] * len(self.routers)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(self.routers)]

    def _hook(self, i: int):
        def record(module, args, output):
            if self.training_only and not module.training:
                return
            choice = biased_choice(module, output[0]) if hasattr(module, "balancing_biases") else output[-1]
            if choice.is_floating_point() or (choice.numel() and int(choice.max()) >= num_classes(module)):
                return  # a router driven by expert parallelism (AutoEP) in another layout: its load is not counted
            counts = torch.bincount(choice.reshape(-1), minlength=num_classes(module)).to(torch.float64)
            self.counts[i] = counts if self.counts[i] is None else self.counts[i] + counts
        return record

    def take(self, device) -> torch.Tensor:
        """(routers, classes) counts recorded since the last call, then reset (zeros for routers never run)."""
        width = max((num_classes(m) for _, m in self.routers), default=0)
        out = torch.zeros(len(self.routers), width, dtype=torch.float64, device=device)
        for i, c in enumerate(self.counts):
            if c is not None:
                out[i, :c.numel()] = c.to(device)
        self.counts = [None] * len(self.routers)
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def load_metrics(counts_C: torch.Tensor, num_experts: int, has_skip: bool) -> dict[str, float]:
    """Load metrics of one router from its class counts (experts first, then the skip class if any)."""
    experts = counts_C[:num_experts].double()
    total = float(counts_C.sum())
    routed = float(experts.sum())
    out = {}
    if routed > 0:
        share = experts / routed
        out["max_load"] = float(share.max()) * num_experts
        out["min_load"] = float(share.min()) * num_experts
        out["load_ratio"] = float(experts.max() / experts.min().clamp(min=1))
        nz = share[share > 0]
        out["load_entropy"] = float(-(nz * nz.log()).sum()) / math.log(num_experts) if num_experts > 1 else 1.0
    if has_skip:
        out["skip_share"] = float(counts_C[num_experts]) / total if total > 0 else 0.0
    return out


class RouterBalancer:
    """Balances ZAYA's router biases after each optimizer step and reports the load of every router.

    Call `after_step()` on every rank right after the optimizer step; `state_dict()` goes into the checkpoint's
    client state (the biases themselves are model buffers and travel with the module's state).
    """

    def __init__(self, model: nn.Module, cfg: RouterBalanceConfig, group=None):
        self.cfg = cfg.validate()
        self.group = group
        self.recorder = LoadRecorder(model)
        self.biased = [m for _, m in self.recorder.routers if hasattr(m, "balancing_biases")]
        for m in self.biased:  # engines may have cast the buffer down (bf16); updates of 1e-3 need fp32
            m.balancing_biases = m.balancing_biases.detach().to(torch.float32)
        n = [self._balanced_classes(m) for m in self.biased]
        self.params = [nn.Parameter(torch.zeros(k, dtype=torch.float32)) for k in n]
        self.integral = [torch.zeros(k, dtype=torch.float64) for k in n]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.update_rate, betas=tuple(cfg.betas),
                                           weight_decay=0.0) if self.params and cfg.rule == "pid" else None
        self.window: torch.Tensor | None = None
        self.step_extremes: torch.Tensor | None = None  # (routers, 3): sums of per-step max_load, min_load; steps

    def _balanced_classes(self, router: nn.Module) -> int:
        return router.num_experts if self.cfg.skip_share is None else router.num_experts + 1

    def _targets(self, router: nn.Module) -> torch.Tensor:
        e, s = router.num_experts, self.cfg.skip_share
        if s is None:
            return torch.full((e,), 1.0 / e, dtype=torch.float64)
        return torch.tensor([(1 - s) / e] * e + [s], dtype=torch.float64)

    # --- one optimizer step ------------------------------------------------------------------------------------
    def global_counts(self, device) -> torch.Tensor:
        """This step's (routers, classes) counts summed over the group (every rank must call)."""
        counts = self.recorder.take(device)
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(counts, group=self.group)
        return counts.cpu()

    def errors(self, counts_RC: torch.Tensor) -> list[torch.Tensor | None]:
        """Per biased router: target share - measured share over its balanced classes (None: no tokens)."""
        rows = [i for i, (_, m) in enumerate(self.recorder.routers) if hasattr(m, "balancing_biases")]
        out = []
        for i, router in zip(rows, self.biased):
            c = counts_RC[i, :self._balanced_classes(router)]
            out.append(None if c.sum() == 0 else self._targets(router) - c / c.sum())
        return out

    @torch.no_grad()
    def update(self, errors: list[torch.Tensor | None], rate_scale: float = 1.0) -> None:
        """Move the biases by the configured rule (the expert mean stays put when the skip class is left alone).
        rate_scale multiplies the update rate (`follow_lr`: the model's current lr over its peak)."""
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.cfg.update_rate * rate_scale
        for p, router in zip(self.params, self.biased):
            p.copy_(router.balancing_biases[:p.numel()])
        if self.cfg.rule == "pid":
            for p, integral, err in zip(self.params, self.integral, errors):
                if err is None:
                    p.grad = None
                    continue
                integral.mul_(self.cfg.integral_decay).add_(err)
                p.grad = (-(self.cfg.kp * err + self.cfg.ki * integral)).to(torch.float32)
            before = [p.detach().clone() for p in self.params]
            self.optimizer.step()
            deltas = [p - b for p, b in zip(self.params, before)]
        else:
            deltas = [torch.zeros_like(p) if err is None else self.cfg.update_rate * rate_scale * torch.sign(err).float()
                      for p, err in zip(self.params, errors)]
        for p, delta, router in zip(self.params, deltas, self.biased):
            if self.cfg.skip_share is None:
                delta = delta - delta.mean()
            router.balancing_biases[:p.numel()] += delta.to(router.balancing_biases)

    def after_step(self, step: int, logger=None, log_every: int = 1, device=None, rate_scale: float = 1.0) -> None:
        """Count this step's routing over the group, update the biases, log the window's load every `log_every`."""
        device = device or (self.biased[0].balancing_biases.device if self.biased else "cpu")
        counts = self.global_counts(device)
        self.window = counts if self.window is None else self.window + counts
        extremes = self._step_extremes(counts)
        self.step_extremes = extremes if self.step_extremes is None else self.step_extremes + extremes
        if self.cfg.enabled and self.biased:
            self.update(self.errors(counts), rate_scale)
        if logger is not None and step % log_every == 0:
            per_layer = self.metrics(self.window, self.step_extremes)
            self.window = self.step_extremes = None
            if per_layer:
                logger.log(step, flatten(per_layer), prefix="router")
                logger.update_summary({"router_load": per_layer})

    def _step_extremes(self, counts_RC: torch.Tensor) -> torch.Tensor:
        """(routers, 3): this step's max_load and min_load per router and a step count (zeros: no routed tokens)."""
        out = torch.zeros(len(self.recorder.routers), 3, dtype=torch.float64)
        for i, (_, m) in enumerate(self.recorder.routers):
            one = load_metrics(counts_RC[i], m.num_experts, False)
            if "max_load" in one:
                out[i] = torch.tensor([one["max_load"], one["min_load"], 1.0], dtype=torch.float64)
        return out

    def metrics(self, counts_RC: torch.Tensor, step_extremes: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
        """{"layer<i>": load metrics} from (routers, classes) counts (routers in model order), plus the per-step
        extremes averaged over the window's steps when given."""
        out = {f"layer{i}": load_metrics(counts_RC[i], m.num_experts, hasattr(m, "balancing_biases"))
               for i, (_, m) in enumerate(self.recorder.routers)}
        if step_extremes is not None:
            for i, (max_sum, min_sum, steps) in enumerate(step_extremes.tolist()):
                if steps > 0:
                    out[f"layer{i}"].update(step_max_load=max_sum / steps, step_min_load=min_sum / steps)
        return out

    # --- checkpoint ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"integral": [t.clone() for t in self.integral],
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "window": None if self.window is None else self.window.clone(),
                "step_extremes": None if self.step_extremes is None else self.step_extremes.clone()}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore the controller (None: a checkpoint written before balancing existed; start it fresh)."""
        if state is None:
            return
        if len(state["integral"]) != len(self.integral):
            raise ValueError(f"checkpoint's router_balance state has {len(state['integral'])} routers, the model "
                             f"{len(self.integral)}: the checkpoint belongs to another architecture")
        self.integral = [t.clone() for t in state["integral"]]
        self.window = None if state.get("window") is None else state["window"].clone()
        self.step_extremes = None if state.get("step_extremes") is None else state["step_extremes"].clone()
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])


def flatten(per_layer: dict[str, dict[str, float]]) -> dict[str, float]:
    """Keys `layer<i>/<metric>` plus the worst layer's: max_load, min_load, load_ratio (logged under router/)."""
    out = {f"{name}/{k}": v for name, metrics in per_layer.items() for k, v in metrics.items()}
    layers = [m for m in per_layer.values() if "max_load" in m]
    if layers:
        out["max_load"] = max(m["max_load"] for m in layers)
        out["min_load"] = min(m["min_load"] for m in layers)
        out["load_ratio"] = max(m["load_ratio"] for m in layers)
    stepped = [m for m in layers if "step_max_load" in m]
    if stepped:
        out["step_max_load"] = max(m["step_max_load"] for m in stepped)
        out["step_min_load"] = min(m["step_min_load"] for m in stepped)
    return out


@torch.no_grad()
def measure_router_load(lm: nn.Module, input_ids_NS: torch.Tensor, micro_batch: int) -> dict[str, dict[str, float]]:
    """{"layer<i>": load metrics} of `lm`'s routers on these rows (plain causal forwards, any mode); {} for a dense
    model. The phase-end check's view of the load, next to the training-time one."""
    recorder = LoadRecorder(lm, training_only=False)
    try:
        if not recorder.routers:
            return {}
        for i in range(0, len(input_ids_NS), max(1, micro_batch)):
            lm(input_ids=input_ids_NS[i:i + micro_batch], use_cache=False)
        counts = recorder.take(input_ids_NS.device).cpu()
    finally:
        recorder.remove()
    return {f"layer{i}": load_metrics(counts[i], m.num_experts, hasattr(m, "balancing_biases"))
            for i, (_, m) in enumerate(recorder.routers)}
