"""Adversarial Network Compression (Belagiannis et al. 2018): L2 on the logits plus a game on the last block.

A step, given one teacher's (named, the mean of all, or one drawn per step) cached logits and last-block
vectors:
- `l2_logits`: lambda * ||f_t(x) - f_s(x)||^2 on the logits, summed over classes, averaged over the batch
  (L_data);
- the game on the last block at full weight (L_adv). D sees the student's noisy features: the noise z is
  the student's dropout (`dropout`, set on the student through `student_kwargs`), applied to its last block's
  output, which both the classifier and the alignment read;
- D's regularisation, the seed's ablation: none, L1 (`d_l1`) or L2 (`d_weight_decay`) on D's weights,
  or "adversarial samples" (`adv_sample_rate`): extra student vectors, a fraction of the batch, added
  to D's batch labelled teacher.
With several teachers the paper's single teacher becomes the mean of their logits (`teacher: mean`,
the default): one teacher drawn per step is a noisy target whose scale differs per teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import check
from pipeline.methods.base import GameConfig, Method, check_teacher_choice, named_teacher, register
from pipeline.models import NUM_BLOCKS


@dataclass
class AncConfig(GameConfig):
    teacher: str = "mean"  # mean (of the teachers' outputs) | random (one per step, as MEAL) | a teacher's name
    logit_weight: float = 1.0  # lambda: weight of the squared L2 distance between student and teacher logits
    adv_sample_rate: float = 0.1  # adversarial samples per batch, as a fraction of it: extra student rows labelled teacher
    adv_weight: float = 1.0  # ANC's objective is L_adv + lambda L_data: the adversarial term at full weight
    dropout: float = 0.1  # ANC's noise z: dropout on the student's last block, which D and the classifier read
    # (replaces student.model.dropout)

    def __post_init__(self) -> None:
        self.check_game("distill.anc")
        check(0 <= self.dropout < 1, f"distill.anc.dropout = {self.dropout} must be in [0, 1)")
        check(self.logit_weight >= 0, f"distill.anc.logit_weight = {self.logit_weight} must be >= 0")
        check(0 <= self.adv_sample_rate < 1, f"distill.anc.adv_sample_rate = {self.adv_sample_rate} must be in [0, 1)")


@register
class Anc(Method):
    """lambda * L2 on the logits + the game on the last block's features."""

    name = "anc"
    Config = AncConfig
    feature_blocks = (NUM_BLOCKS - 1,)

    @classmethod
    def check_teachers(cls, cfg, teachers):
        check_teacher_choice(cfg.teacher, ("random", "mean"), teachers, "distill.anc.teacher")

    def __init__(self, cfg: AncConfig, teachers, block_names):
        super().__init__(cfg, teachers, block_names)
        self.fixed = named_teacher(cfg.teacher, teachers)

    def student_kwargs(self, model_kwargs):
        return {**model_kwargs, "dropout": self.cfg.dropout}  # ANC's noise z is the student's dropout

    def notes(self):
        return [] if self.cfg.dropout else ["anc: distill.anc.dropout is 0, so the student gets no noise (ANC's z "
                                            "is dropout)"]

    def pick(self, rng):
        if self.cfg.teacher == "random":
            return [rng.randrange(len(self.teachers))]
        return [self.fixed] if self.fixed is not None else super().pick(rng)

    def losses(self, out, tgt, labels):
        # the mean over the picked teachers is the teacher itself when one was picked
        diff = out.logits.float() - tgt.logits.mean(0)  # (B, C)
        return {"l2_logits": self.cfg.logit_weight * diff.square().sum(1).mean()}

    def discriminators(self, num_classes, lengths):
        return {} if self.game is None else {self.block_names[-1]: lengths[-1]}

    def disc_inputs(self, out, tgt):
        return out.blocks, [tgt.blocks[0].mean(0)]  # [(B, L)] each: the last block

    def adversarial_rows(self, batch):
        return int(round(self.cfg.adv_sample_rate * batch))
