"""The baseline every method is held to: cross-entropy with the labels, on the same views and schedule."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from pipeline.config import check
from pipeline.methods.base import Method, register


@dataclass
class ScratchConfig:
    label_smoothing: float = 0.0  # cross-entropy label smoothing (fraction)

    def __post_init__(self) -> None:
        check(0 <= self.label_smoothing < 1, f"distill.scratch.label_smoothing = {self.label_smoothing} must be in [0, 1)")


@register
class Scratch(Method):
    """No teacher: `ce` is the only term."""

    name = "scratch"
    Config = ScratchConfig
    uses_teachers = False

    def pick(self, rng):
        return []

    def losses(self, out, tgt, labels):
        return {"ce": F.cross_entropy(out.logits.float(), labels, label_smoothing=self.cfg.label_smoothing)}
