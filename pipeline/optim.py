"""The one SGD config of pretraining and distillation, and the helpers that turn it into an optimizer.

    SGDConfig      lr, momentum, Nesterov, weight decay, schedule and warm-up, with their checks
    param_groups() weight decay on conv/linear weights only
    make_sgd()     the optimizer both trainings step
    set_lr()       the schedule's rate into every group that follows it
    lr_at()        the schedule: the rate as a pure function of the step (no scheduler objects, no hidden state)

`set_lr(opt, lr_at(step, ...))` writes the rate before each step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from pipeline.config import check, check_choice
from pipeline.device import fused_optimizer


@dataclass(kw_only=True)  # keyword-only, so a subclass may give some fields defaults and add its own after
class SGDConfig:
    lr: float  # peak learning rate (SGD)
    momentum: float = 0.9  # SGD momentum
    nesterov: bool  # Nesterov momentum (when momentum > 0)
    weight_decay: float = 5e-4  # L2 penalty on conv/linear weights (not on BatchNorm/bias)
    schedule: str  # cosine | onecycle | constant (pipeline.optim), per optimizer step
    warmup_epochs: float  # linear warm-up length (epochs)

    def check_sgd(self, where: str, epochs: int) -> None:
        """The range checks of these fields; `where` is the params section the messages name."""
        check(self.lr > 0, f"{where}.lr = {self.lr} must be positive")
        check(0 <= self.momentum < 1, f"{where}.momentum = {self.momentum} must be in [0, 1)")
        check(self.weight_decay >= 0, f"{where}.weight_decay = {self.weight_decay} must be >= 0")
        check_choice(self.schedule, SCHEDULES, f"{where}.schedule")
        check(0 <= self.warmup_epochs <= epochs, f"{where}.warmup_epochs = {self.warmup_epochs} must be in [0, epochs]")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only; BatchNorm scales and biases are left undecayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_sgd(groups: list[dict[str, Any]], cfg: SGDConfig) -> torch.optim.SGD:
    """SGD over `groups` (from `param_groups`, plus any extra group) with the config's rate and momentum."""
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           **fused_optimizer())


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """`lr` into every param group, times the group's `lr_scale` where it has one (the cooperative game's
    discriminators: d_lr / lr, so they follow the student's schedule at their own peak rate)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# ---------------------------------------------------------------- the schedules


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, kind: str = "cosine") -> float:
    """Learning rate at optimizer step `step` (0-based) of `total_steps`.

    - `cosine`: linear warm-up from 0 over `warmup_steps`, then cosine decay to 0 at `total_steps`.
    - `onecycle`: linear up to base_lr over `warmup_steps`, then linear down to 0 (airbench-style).
    - `constant`: base_lr after warm-up.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return base_lr
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if kind == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "onecycle":
        return base_lr * (1.0 - progress)
    raise ValueError(f"unknown schedule {kind!r}")


SCHEDULES = ("cosine", "onecycle", "constant")
