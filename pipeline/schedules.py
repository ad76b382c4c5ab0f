"""Learning-rate schedules as pure functions of the step: no scheduler objects, no hidden state."""

from __future__ import annotations

import math


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
