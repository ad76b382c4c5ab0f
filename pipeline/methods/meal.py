"""MEAL (Shen et al., AAAI 2019): the student learns from one teacher of the ensemble drawn per step.

The official code (AaronHeee/MEAL, main.py and loss.py) selects outputs (`--out_layer`: pooled block
vectors and the logits), and on each selected output puts
- a similarity term, gamma * loss(student output, teacher output) (`--gamma`, `--loss`: `ce` by default,
  the soft cross-entropy against the teacher's softmax at T = 1, on pooled vectors too), and
- a discriminator, eta * its BCE (`--eta`, `--adv`).
Here the outputs are the cache's blocks and the logits:
- `sim_logits`: logit_weight * similarity(student logits, teacher logits) (gamma of the logits);
- `sim_<block>`: block_weights[b] * similarity(student vector, teacher vector) for each block of weight > 0;
- `ce`: ce_weight * cross-entropy with the labels (the paper and the code use none);
- the game (pipeline.methods.games): one discriminator on each block with block_eta[b] > 0 and on the
  logits (raw, as the official code) when logit_eta > 0, teacher outputs against the student's,
  each weighing its eta. The official 5-teacher recipe uses the logits alone (`--out_layer [-1]`):
  block_weights and block_eta all 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F

from pipeline.config import check, check_choice
from pipeline.methods.losses import SIMILARITIES, similarity
from pipeline.methods.base import GameConfig, Method, register
from pipeline.models import NUM_BLOCKS


@dataclass
class MealConfig(GameConfig):
    similarity: str = "ce"  # ce (official default) | l1 | l2 | kl, on each aligned block
    logit_similarity: str = "ce"  # ce (official default) | l1 | l2 | kl, on the logits (softmax at T)
    temperature: float = 1.0  # softmax temperature of ce and kl (official: 1)
    logit_weight: float = 1.0  # gamma of the logits: weight of their similarity
    block_weights: list[float] = field(default_factory=lambda: [1.0] * NUM_BLOCKS)  # gamma per block
    logit_eta: float = 1.0  # eta of the logits: weight of a discriminator on them (0: none)
    block_eta: list[float] = field(default_factory=lambda: [1.0] * NUM_BLOCKS)  # eta per block (0: no D there)
    ce_weight: float = 0.0  # weight of hard-label cross-entropy (MEAL uses none)

    def __post_init__(self) -> None:
        self.check_game("distill.meal")
        check_choice(self.similarity, SIMILARITIES, "distill.meal.similarity")
        check_choice(self.logit_similarity, SIMILARITIES, "distill.meal.logit_similarity")
        check(self.temperature > 0, f"distill.meal.temperature = {self.temperature} must be positive")
        check(self.logit_weight >= 0, f"distill.meal.logit_weight = {self.logit_weight} must be >= 0")
        check(self.logit_eta >= 0, f"distill.meal.logit_eta = {self.logit_eta} must be >= 0")
        for key in ("block_weights", "block_eta"):
            value = getattr(self, key)
            check(len(value) == NUM_BLOCKS and all(w >= 0 for w in value),
                  f"distill.meal.{key} = {value} must be {NUM_BLOCKS} weights >= 0, one per block")
        check(self.ce_weight >= 0, f"distill.meal.ce_weight = {self.ce_weight} must be >= 0")
        check(self.adversarial != "none" or self.logit_weight > 0 or any(self.block_weights) or self.ce_weight > 0,
              "distill.meal: every weight is 0 and there is no game, so the student would learn nothing: "
              "give logit_weight or block_weights a weight > 0")


@register
class Meal(Method):
    """One teacher drawn per step; a similarity and a discriminator on each selected output."""

    name = "meal"
    Config = MealConfig

    def __init__(self, cfg: MealConfig, teachers, block_names):
        super().__init__(cfg, teachers, block_names)
        game = self.game is not None
        # the blocks with a discriminator, then the blocks the method reads at all (compared or discriminated)
        self.disc_blocks = tuple(b for b in range(NUM_BLOCKS) if game and cfg.block_eta[b] > 0)
        self.feature_blocks = tuple(b for b in range(NUM_BLOCKS) if cfg.block_weights[b] > 0 or b in self.disc_blocks)
        self.disc_logits = game and cfg.logit_eta > 0

    def pick(self, rng):
        return [rng.randrange(len(self.teachers))]

    def losses(self, out, tgt, labels):
        c = self.cfg
        terms = {}
        if c.logit_weight > 0:
            terms["sim_logits"] = c.logit_weight * similarity(out.logits, tgt.logits[0], c.logit_similarity,
                                                              c.temperature)
        for g, b in enumerate(self.feature_blocks):
            if c.block_weights[b] > 0:
                sim = similarity(out.blocks[g], tgt.blocks[g][0], c.similarity, c.temperature)
                terms[f"sim_{self.block_names[b]}"] = c.block_weights[b] * sim
        if c.ce_weight > 0:
            terms["ce"] = c.ce_weight * F.cross_entropy(out.logits.float(), labels)
        return terms

    def discriminators(self, num_classes, lengths):
        dims = {self.block_names[b]: lengths[b] for b in self.disc_blocks}
        return dims | ({"logits": num_classes} if self.disc_logits else {})

    def disc_weights(self):
        return [self.cfg.block_eta[b] for b in self.disc_blocks] + ([self.cfg.logit_eta] if self.disc_logits else [])

    def disc_inputs(self, out, tgt):
        at = {b: g for g, b in enumerate(self.feature_blocks)}
        student = [out.blocks[at[b]] for b in self.disc_blocks]
        teacher = [tgt.blocks[at[b]][0] for b in self.disc_blocks]
        if self.disc_logits:  # raw logits, as the official discriminator reads outputs[-1]
            student, teacher = student + [out.logits.float()], teacher + [tgt.logits[0]]
        return student, teacher
