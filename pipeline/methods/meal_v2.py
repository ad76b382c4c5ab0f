"""MEAL V2 (Shen & Savvides 2020): the student matches the ensemble's mean softmax, with no labels.

A step, given every teacher's cached logits:
- `soft_ce`: T^2 * soft cross-entropy of the student's softmax at T against the mean of the teachers'
  softmax at T (the official code's loss at T = 1);
- the game: one discriminator on the final outputs: the raw logits, the student's against the mean of
  the teachers' raw logits (`d_input: logits`, the official code's), or the softened probabilities
  (`probs`, ours).
The official recipe (szq0214/MEAL-V2, train.py) fine-tunes a pretrained student (`student.init`), plays
the cooperative game with the official discriminator, D's learning rate equal to the student's, SGD at
lr 0.01 with no weight decay: scripts/ablation.py runs it as `meal_v2_ft`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import check, check_choice
from pipeline.methods.losses import soft_cross_entropy, soften
from pipeline.methods.base import GameConfig, Method, Targets, register


@dataclass
class MealV2Config(GameConfig):
    temperature: float = 1.0  # softmax temperature of the teachers' mean and the student's soft cross-entropy
    d_input: str = "logits"  # logits (official: raw, teachers' mean) | probs (ours: softmax at T): what D sees

    def __post_init__(self) -> None:
        self.check_game("distill.meal_v2")
        check(self.temperature > 0, f"distill.meal_v2.temperature = {self.temperature} must be positive")
        check_choice(self.d_input, ("probs", "logits"), "distill.meal_v2.d_input")


@register
class MealV2(Method):
    """Soft cross-entropy to the mean of the teachers' softmax, no labels; one D on the outputs."""

    name = "meal_v2"
    Config = MealV2Config

    def target(self, tgt: Targets) -> torch.Tensor:
        """The ensemble's soft label: the mean of the teachers' softmax at T, (B, C)."""
        return soften(tgt.logits, self.cfg.temperature).mean(0)

    def losses(self, out, tgt, labels):
        t = self.cfg.temperature
        return {"soft_ce": soft_cross_entropy(out.logits.float() / t, self.target(tgt)) * t**2}

    def discriminators(self, num_classes, lengths):
        return {} if self.game is None else {"outputs": num_classes}

    def disc_inputs(self, out, tgt):
        if self.cfg.d_input == "logits":
            return [out.logits.float()], [tgt.logits.mean(0)]
        return [soften(out.logits, self.cfg.temperature)], [self.target(tgt)]
