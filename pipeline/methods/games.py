"""The adversarial game, one small object per mode, each with the same hooks.

- `student_groups()`: parameter groups the game adds to the student's SGD (cooperative: D's);
- `play(student, teacher, rows)`, called after the student's forward: D's own turn where it has one,
  then what the game adds to the student's objective (`Played`);
- `step()`, called after the student's backward and step: D's optimizer step where it comes last.

The modes (`adversarial` in a method's options; docs/design.md section 4):
- `alternating`, the MEAL paper's: D first steps on its loss against the student's vectors as they
  are (detached), then the student minimises w * the non-saturating fooling loss through D held fixed.
- `reversal`: one backward through a gradient-reversal layer, so D descends its loss and the student
  ascends w * it (the minimax form); D's optimizer steps after that backward.
- `cooperative`, the official MEAL code's: w * D's loss is added to the student's loss and D trains in
  the student's SGD, so the student's gradient helps D tell it apart from the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.device import fused_optimizer
from pipeline.discriminators import Discriminators, discriminator_loss, fooling_loss
from pipeline.losses import grad_reverse
from pipeline.methods.base import GameConfig


@dataclass
class Played:
    adv: torch.Tensor  # (G,) the student's adversarial term per discriminator, as reported
    objective: torch.Tensor  # scalar: what the game adds to the student's backward
    d_loss: torch.Tensor  # (G,) each D's binary cross-entropy
    d_acc: torch.Tensor  # (G,) each D's accuracy on this batch


class Game:
    def __init__(self, cfg: GameConfig, discs: Discriminators):
        self.cfg, self.discs = cfg, discs
        self.opt = self.make_optimizer()

    def make_optimizer(self) -> torch.optim.Optimizer | None:
        """D's own optimizer (alternating, reversal): Adam with GAN betas, or SGD with momentum."""
        g, params = self.cfg, self.discs.parameters()
        if g.d_optimizer == "adam":
            return torch.optim.Adam(params, lr=g.d_lr, betas=(0.5, 0.999), weight_decay=g.d_weight_decay,
                                    **fused_optimizer())
        return torch.optim.SGD(params, lr=g.d_lr, momentum=0.9, weight_decay=g.d_weight_decay, **fused_optimizer())

    def student_groups(self) -> list[dict]:
        return []

    def play(self, student: torch.Tensor, teacher: torch.Tensor, rows: int) -> Played:
        """`student`, `teacher`: (G, B, D) float32 discriminator inputs; `rows`: ANC's adversarial samples."""
        raise NotImplementedError

    def step(self) -> None:
        pass


def without_adversarial_rows(student: torch.Tensor, rows: int) -> torch.Tensor:
    """ANC's adversarial samples regularise D only: no student gradient through them."""
    return torch.cat([student[:, :rows].detach(), student[:, rows:]], dim=1) if rows > 0 else student


class Alternating(Game):
    def play(self, student, teacher, rows):
        d_loss, acc = discriminator_loss(self.discs, teacher, student.detach(), rows)  # (G,) each
        self.opt.zero_grad(set_to_none=True)
        d_loss.sum().backward()
        self.opt.step()  # D's turn, before the student's
        adv = self.cfg.adv_weight * fooling_loss(self.discs, student)  # (G,), through the updated D held fixed
        return Played(adv, adv.sum(), d_loss.detach(), acc)


class Reversal(Game):
    def play(self, student, teacher, rows):
        w = self.cfg.adv_weight
        reversed_ = grad_reverse(without_adversarial_rows(student, rows), w)  # D descends, the student ascends w * it
        d_loss, acc = discriminator_loss(self.discs, teacher, reversed_, rows)
        self.opt.zero_grad(set_to_none=True)
        # reported: what the student effectively minimises
        return Played(-w * d_loss.detach(), d_loss.sum(), d_loss.detach(), acc)

    def step(self):
        self.opt.step()


class Cooperative(Game):
    def make_optimizer(self):
        return None  # D trains inside the student's optimizer, on the summed loss

    def student_groups(self):
        g = self.cfg
        return [{"params": list(self.discs.parameters()), "lr": g.d_lr, "weight_decay": g.d_weight_decay,
                 "fixed_lr": True}]

    def play(self, student, teacher, rows):
        d_loss, acc = discriminator_loss(self.discs, teacher, without_adversarial_rows(student, rows), rows)
        adv = self.cfg.adv_weight * d_loss  # the student helps D
        return Played(adv, adv.sum(), d_loss.detach(), acc)


GAMES = {"alternating": Alternating, "reversal": Reversal, "cooperative": Cooperative}


def make_game(cfg: GameConfig | None, discs: Discriminators | None) -> Game | None:
    return None if cfg is None else GAMES[cfg.adversarial](cfg, discs)
