"""The one SGD config of pretraining and distillation, and the helpers that turn it into an optimizer.

    SGDConfig      lr, momentum, Nesterov, weight decay, schedule and warm-up, with their checks
    param_groups() weight decay on conv/linear weights only, or on every parameter (`decay_all`)
    make_sgd()     the optimizer both trainings step
    set_lr()       the schedule's rate into every group that follows it
    lr_at()        the schedule: the rate as a pure function of the step (no scheduler objects, no hidden state)
    sgd_lr()       lr_at for a config, at step i of an epoch of `steps` steps

`set_lr(opt, sgd_lr(cfg, step, steps))` writes the rate before each step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn

from pipeline.config import check, check_choice
from pipeline.device import fused_optimizer


@dataclass(kw_only=True)  # keyword-only, so a subclass may give some fields defaults and add its own after
class SGDConfig:
    lr: float  # peak learning rate (SGD)
    momentum: float = 0.9  # SGD momentum
    nesterov: bool  # Nesterov momentum (when momentum > 0)
    weight_decay: float = 5e-4  # L2 penalty on conv/linear weights (not on BatchNorm/bias unless decay_all)
    schedule: str  # cosine | onecycle | constant | step (pipeline.optim), per optimizer step
    warmup_epochs: float  # linear warm-up length (epochs)
    milestones: list[float] = field(default_factory=list)  # schedule: step: the epochs at which the rate is
    # multiplied by `gamma` (MultiStepLR's; MEAL V2 on ImageNet: [100])
    gamma: float = 0.1  # schedule: step: the factor at each milestone
    decay_all: bool = False  # weight decay on every parameter, BatchNorm and biases too (the official MEAL and
    # MEAL V2 optimizers); false: conv/linear weights only

    def check_sgd(self, where: str, epochs: int) -> None:
        """The range checks of these fields; `where` is the params section the messages name."""
        check(self.lr > 0, f"{where}.lr = {self.lr} must be positive")
        check(0 <= self.momentum < 1, f"{where}.momentum = {self.momentum} must be in [0, 1)")
        check(self.weight_decay >= 0, f"{where}.weight_decay = {self.weight_decay} must be >= 0")
        check_choice(self.schedule, SCHEDULES, f"{where}.schedule")
        check(0 <= self.warmup_epochs <= epochs, f"{where}.warmup_epochs = {self.warmup_epochs} must be in [0, epochs]")
        if self.schedule == "step":
            check(len(self.milestones) > 0 and all(0 < m <= epochs for m in self.milestones)
                  and list(self.milestones) == sorted(set(self.milestones)),
                  f"{where}.milestones = {self.milestones} must be increasing epochs in (0, {epochs}] for "
                  f"schedule: step")
        else:
            check(not self.milestones, f"{where}.milestones = {self.milestones} is set but {where}.schedule is "
                                       f"{self.schedule}: set schedule: step, or milestones: []")
        check(0 < self.gamma <= 1, f"{where}.gamma = {self.gamma} must be in (0, 1]")


# Keys SGDConfig gained after checkpoints were made: an identity holds them only when they differ from these
# defaults (pipeline.config.without_defaults), so those checkpoints still resume.
LATER_KEYS = {"milestones": [], "gamma": 0.1, "decay_all": False}


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only, BatchNorm scales and biases undecayed; with `decay_all` on every
    parameter (one group, as `torch.optim.SGD(model.parameters(), weight_decay=...)` in the official code)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_all:
        return [{"params": params, "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in params:
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


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, kind: str = "cosine",
          milestones: Sequence[int] = (), gamma: float = 0.1) -> float:
    """Learning rate at optimizer step `step` (0-based) of `total_steps`.

    - `cosine`: linear warm-up from 0 over `warmup_steps`, then cosine decay to 0 at `total_steps`.
    - `onecycle`: linear up to base_lr over `warmup_steps`, then linear down to 0 (airbench-style).
    - `constant`: base_lr after warm-up.
    - `step`: base_lr after warm-up, times `gamma` for each of the `milestones` (steps) reached: MultiStepLR
      stepped once an epoch, when the milestones are whole epochs' steps.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return base_lr
    if kind == "step":
        return base_lr * gamma ** sum(step >= m for m in milestones)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if kind == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "onecycle":
        return base_lr * (1.0 - progress)
    raise ValueError(f"unknown schedule {kind!r}")


def sgd_lr(cfg: SGDConfig, step: int, steps_per_epoch: int, epochs: int) -> float:
    """The rate of `cfg`'s schedule at optimizer step `step` of a run of `epochs` epochs of `steps_per_epoch`."""
    return lr_at(step, steps_per_epoch * epochs, cfg.lr, int(cfg.warmup_epochs * steps_per_epoch), cfg.schedule,
                 [round(m * steps_per_epoch) for m in cfg.milestones], cfg.gamma)


SCHEDULES = ("cosine", "onecycle", "constant", "step")
