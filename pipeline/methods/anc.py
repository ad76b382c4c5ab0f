"""Adversarial Network Compression (Belagiannis et al. 2018): L2 on the logits plus a game on the last block.

A step, given one teacher's (drawn, named, or the mean of all) cached logits and last-block vectors:
- `l2_logits`: lambda * mean squared difference of student and teacher logits (L_data);
- the game on the last block at full weight (L_adv), with "adversarial samples": a fraction of each
  batch's student vectors shown to D labelled teacher, which keeps D from winning outright;
- the noise z is dropout before the student's classifier (`dropout`, set on the student by the stage).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import check
from pipeline.losses import similarity
from pipeline.methods.base import GameConfig, Method, named_teacher
from pipeline.models import NUM_BLOCKS


@dataclass
class AncConfig(GameConfig):
    teacher: str = "random"  # random (one per step, as MEAL) | mean (of the teachers' outputs) | a teacher's name
    logit_weight: float = 1.0  # lambda: weight of the L2 between student and teacher logits
    adv_sample_rate: float = 0.1  # fraction of each batch's student vectors shown to D labelled "teacher"
    adv_weight: float = 1.0  # ANC's objective is L_adv + lambda L_data: the adversarial term at full weight
    dropout: float = 0.1  # ANC's noise z: dropout before the student's classifier (replaces student.model.dropout)

    def __post_init__(self) -> None:
        self.check_game("distill.anc")
        check(0 <= self.dropout < 1, f"distill.anc.dropout = {self.dropout} must be in [0, 1)")
        check(self.logit_weight >= 0, f"distill.anc.logit_weight = {self.logit_weight} must be >= 0")
        check(0 <= self.adv_sample_rate < 1, f"distill.anc.adv_sample_rate = {self.adv_sample_rate} must be in [0, 1)")


class Anc(Method):
    """lambda * L2 on the logits + the game on the last block's features."""

    name = "anc"
    feature_blocks = (NUM_BLOCKS - 1,)

    def __init__(self, cfg: AncConfig, teachers, block_names):
        super().__init__(cfg, teachers, block_names)
        self.fixed = named_teacher(cfg.teacher, teachers)

    def pick(self, rng):
        if self.cfg.teacher == "random":
            return [rng.randrange(len(self.teachers))]
        return [self.fixed] if self.fixed is not None else super().pick(rng)

    def losses(self, out, tgt, labels):
        # the mean over the picked teachers is the teacher itself when one was picked
        return {"l2_logits": self.cfg.logit_weight * similarity(out.logits, tgt.logits.mean(0), "l2")}

    def discriminators(self, num_classes, dim):
        return {} if self.game is None else {self.block_names[-1]: dim}

    def disc_inputs(self, out, tgt):
        return out.blocks, tgt.blocks.mean(0)  # (1, B, L) each: the last block

    def adversarial_rows(self, batch):
        return int(round(self.cfg.adv_sample_rate * batch))
