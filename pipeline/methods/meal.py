"""MEAL (Shen et al., AAAI 2019): the student learns from one teacher of the ensemble drawn per step.

A step, given the drawn teacher's cached logits and aligned block vectors:
- `sim_logits`: logit_weight * similarity(student logits, teacher logits) (l1 | l2 | kl at T);
- `sim_<block>`: block_weights[b] * similarity(student vector, teacher vector) for each block of weight > 0;
- `ce`: ce_weight * cross-entropy with the labels (the paper uses none);
- the game (pipeline.methods.games): one discriminator per block, teacher vectors against the student's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.config import check, check_choice
from pipeline.losses import SIMILARITIES, similarity
from pipeline.methods.base import GameConfig, Method
from pipeline.models import NUM_BLOCKS


@dataclass
class MealConfig(GameConfig):
    similarity: str = "l2"  # l1 | l2 | kl, on each aligned block
    logit_similarity: str = "l2"  # l1 | l2 | kl, on the logits (kl: against the teacher's softmax at T)
    temperature: float = 1.0  # softmax temperature of the kl similarity
    logit_weight: float = 1.0  # weight of the similarity on the logits
    block_weights: list[float] = field(default_factory=lambda: [1.0] * NUM_BLOCKS)  # similarity weight per block
    ce_weight: float = 0.0  # weight of hard-label cross-entropy (MEAL uses none)

    def __post_init__(self) -> None:
        self.check_game("distill.meal")
        check_choice(self.similarity, SIMILARITIES, "distill.meal.similarity")
        check_choice(self.logit_similarity, SIMILARITIES, "distill.meal.logit_similarity")
        check(self.temperature > 0, f"distill.meal.temperature = {self.temperature} must be positive")
        check(self.logit_weight >= 0, f"distill.meal.logit_weight = {self.logit_weight} must be >= 0")
        check(len(self.block_weights) == NUM_BLOCKS and all(w >= 0 for w in self.block_weights),
              f"distill.meal.block_weights = {self.block_weights} must be {NUM_BLOCKS} weights >= 0, one per block")
        check(self.ce_weight >= 0, f"distill.meal.ce_weight = {self.ce_weight} must be >= 0")


class Meal(Method):
    """One teacher drawn per step; a similarity on the logits and on every block; one D per block."""

    name = "meal"

    def __init__(self, cfg: MealConfig, teachers, block_names):
        super().__init__(cfg, teachers, block_names)
        # every block has a discriminator in the game; without one, only the blocks with a similarity
        # weight are aligned, gathered from the cache and compared
        self.feature_blocks = tuple(b for b in range(NUM_BLOCKS) if self.game is not None or cfg.block_weights[b] > 0)
        self._weights: dict[torch.device, torch.Tensor] = {}  # the block weights (G,) per device

    def pick(self, rng):
        return [rng.randrange(len(self.teachers))]

    def block_weights(self, device: torch.device) -> torch.Tensor | None:
        """The feature blocks' weights (G,), None when every one is 1 (no product needed). Made once per
        device: a tensor built from a list on every step is a host-to-device copy, a sync on CUDA."""
        weights = [self.cfg.block_weights[b] for b in self.feature_blocks]
        if all(w == 1.0 for w in weights):
            return None
        if device not in self._weights:
            self._weights[device] = torch.tensor(weights, device=device)
        return self._weights[device]

    def losses(self, out, tgt, labels):
        c = self.cfg
        terms = {"sim_logits": c.logit_weight * similarity(out.logits, tgt.logits[0], c.logit_similarity, c.temperature)}
        if self.feature_blocks:  # every block at once: (G,) similarities
            sims = similarity(out.blocks, tgt.blocks[0], c.similarity, c.temperature, groups=True)
            weights = self.block_weights(sims.device)
            sims = sims if weights is None else sims * weights
            for b, value in zip(self.feature_blocks, sims.unbind()):
                if c.block_weights[b] > 0:
                    terms[f"sim_{self.block_names[b]}"] = value
        if c.ce_weight > 0:
            terms["ce"] = c.ce_weight * F.cross_entropy(out.logits.float(), labels)
        return terms

    def discriminators(self, num_classes, dim):
        return {} if self.game is None else {self.block_names[b]: dim for b in self.feature_blocks}

    def disc_inputs(self, out, tgt):
        return out.blocks, tgt.blocks[0]
