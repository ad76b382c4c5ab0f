"""Hinton knowledge distillation (Hinton et al. 2015), against one named teacher or the ensemble's mean.

A step, given the teachers' cached logits:
- `kd_soft`: alpha * T^2 * KL(p || softmax(s / T)), p the mean of the teachers' softmax at T;
- `ce`: (1 - alpha) * cross-entropy with the labels. No discriminators.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import check
from pipeline.methods.losses import kd_loss, soften
from pipeline.methods.base import Method, check_teacher_choice, named_teacher, register


@dataclass
class KdConfig:
    teacher: str = "mean"  # mean (of the teachers' softened outputs) | a teacher's name
    temperature: float = 4.0  # T
    alpha: float = 0.9  # weight of the soft part; 1 - alpha goes to cross-entropy with the labels

    def __post_init__(self) -> None:
        check(self.temperature > 0, f"distill.kd.temperature = {self.temperature} must be positive")
        check(0 <= self.alpha <= 1, f"distill.kd.alpha = {self.alpha} must be in [0, 1]")


@register
class Kd(Method):
    """Hinton KD against one named teacher or the mean of the teachers' softened outputs."""

    name = "kd"
    Config = KdConfig

    @classmethod
    def check_teachers(cls, cfg, teachers):
        check_teacher_choice(cfg.teacher, ("mean",), teachers, "distill.kd.teacher")

    def __init__(self, cfg: KdConfig, teachers, block_names):
        super().__init__(cfg, teachers, block_names)
        self.fixed = named_teacher(cfg.teacher, teachers)

    def pick(self, rng):
        return [self.fixed] if self.fixed is not None else super().pick(rng)

    def losses(self, out, tgt, labels):
        c = self.cfg
        probs = soften(tgt.logits, c.temperature).mean(0)  # (B, C)
        _, soft, hard = kd_loss(out.logits, probs, labels, c.temperature, c.alpha)
        return {"kd_soft": c.alpha * soft, "ce": (1.0 - c.alpha) * hard}
