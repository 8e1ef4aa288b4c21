"""Typed settings of router load balancing (the `router_balance` config key; plain data, validated here).

ZAYA routes top-1 over `softmax(router_logits) + balancing_biases` and has no auxiliary balancing loss: the biases
are moved after every optimizer step from the load error over the global batch (`ar2diff.model.router_balance`).

rule: "pid" (Zyphra's PID-inspired controller: the error's proportional and integral terms, fed as the gradient of
    the biases to an AdamW step) or "sign" (DeepSeek-V3: b += update_rate * sign(error)).
update_rate: the step size: AdamW's learning rate for "pid", u for "sign". 1e-3 is DeepSeek-V3's u.
kp, ki: weights of the proportional and integral terms of the "pid" rule. integral_decay: the integral is the
    leaky sum I <- integral_decay * I + error (1 = plain sum; < 1 forgets an early collapse instead of overshooting
    after it). betas: AdamW's betas for "pid".
skip_share: the skip class. None (default): its bias stays as the checkpoint has it (-1 at initialisation, so it
    practically never wins) and the experts are balanced over the tokens routed to experts, target 1/E each.
    A number s in [0, 1): the skip class is balanced to a share s of all tokens, each expert to (1 - s)/E.
follow_lr (default on): after warmup, scale the update rate by the model's current learning rate over its peak
    (`schedule.lr`), so the biases settle as the schedule anneals (DeepSeek-V3 sets its update speed to 0 for its
    last 500B tokens). A constant rate keeps the biases moving by ~update_rate a step to the end; where a router's
    probabilities vary across tokens by less than that, its choice follows the biases, not the tokens, and the load
    is balanced only over time (README, "ZAYA as its authors train and decode it", has the quickstart measurement).
follow_lr_floor: the smallest multiplier `follow_lr` applies (0.3: the step never falls below 0.3 x update_rate).
    Annealed to the schedule's own floor (0.1 in the quickstart) the controller was too slow to revive an expert
    the router learned to avoid late in training; 0.3 kept every expert near 0.5x-2x of uniform on two seeds.
enabled: False leaves the biases untouched (the load metrics are still logged).
"""

from __future__ import annotations

from dataclasses import dataclass, field

RULES = ("pid", "sign")


@dataclass
class RouterBalanceConfig:
    enabled: bool = True
    rule: str = "pid"
    update_rate: float = 1e-3
    kp: float = 1.0
    ki: float = 0.1
    integral_decay: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    skip_share: float | None = None
    follow_lr: bool = True
    follow_lr_floor: float = 0.3

    def validate(self) -> RouterBalanceConfig:
        if self.rule not in RULES:
            raise ValueError(f"router_balance.rule={self.rule!r} must be one of {RULES}")
        if not self.update_rate > 0:
            raise ValueError(f"router_balance.update_rate={self.update_rate} must be > 0")
        if self.kp < 0 or self.ki < 0 or self.kp + self.ki == 0:
            raise ValueError(f"router_balance.kp={self.kp}, ki={self.ki} must be >= 0 and not both 0")
        if not 0 <= self.integral_decay <= 1:
            raise ValueError(f"router_balance.integral_decay={self.integral_decay} must be in [0, 1]")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"router_balance.betas={list(self.betas)} must be two numbers in [0, 1)")
        if not 0 <= self.follow_lr_floor <= 1:
            raise ValueError(f"router_balance.follow_lr_floor={self.follow_lr_floor} must be in [0, 1]")
        if self.skip_share is not None and not 0 <= self.skip_share < 1:
            raise ValueError(f"router_balance.skip_share={self.skip_share} must be in [0, 1) or null (skip class "
                             "left alone)")
        return self
