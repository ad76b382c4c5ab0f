"""The adversarial game, one small object per mode, each with the same hooks.

- `student_groups()`: parameter groups the game adds to the student's SGD (cooperative: D's);
- `play(student, teacher, rows)`, called after the student's forward: D's own turn where it has one,
  then what the game adds to the student's objective (`Played`);
- `after_backward()`, called after the student's backward: under torchrun, D's gradients averaged over
  the ranks where the student's step uses them (cooperative);
- `step()`, called after the student's backward and step: D's optimizer step where it comes last.

Under torchrun every D step follows a mean of D's gradients over the ranks (`sync`), as DDP does for the
student, and `weight` (the rank's shard weight) scales what each rank differentiates.

The modes (`adversarial` in a method's options; docs/design.md section 4):
- `alternating`, the MEAL paper's: D first steps on its loss against the student's vectors as they
  are (detached), then the student minimises w * the non-saturating fooling loss through D held fixed.
- `reversal`: one backward through a gradient-reversal layer, so D descends its loss and the student
  ascends w * it (the minimax form); D's optimizer steps after that backward.
- `cooperative`, the official MEAL and MEAL V2 code's: w_g * each D's loss is added to the student's loss
  and D trains in the student's SGD (its group at d_lr, on the student's schedule), so the student's
  gradient helps D tell it apart from the teacher.

Every mode weighs discriminator g by adv_weight * the method's weight for it (MEAL's per-output eta).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.device import fused_optimizer
from pipeline.dist import World, average_gradients
from pipeline.methods.discriminators import Discriminators, discriminator_loss, fooling_loss
from pipeline.methods.losses import grad_reverse
from pipeline.methods.base import GameConfig


@dataclass
class Played:
    adv: torch.Tensor  # (G,) the student's adversarial term per discriminator, as reported
    objective: torch.Tensor  # scalar: what the game adds to the student's backward
    d_loss: torch.Tensor  # (G,) each D's binary cross-entropy
    d_acc: torch.Tensor  # (G,) each D's accuracy on this batch


class Game:
    """`weights` (G,): each discriminator's weight in the student's objective (MEAL's eta), times adv_weight."""

    def __init__(self, cfg: GameConfig, discs: Discriminators, weights: list[float], world: World = World()):
        self.cfg, self.discs, self.world = cfg, discs, world
        self.weight_values = [cfg.adv_weight * w for w in weights]  # on the host: the reversal layer's scales
        self.weights = torch.tensor(self.weight_values, device=next(discs.parameters()).device)  # (G,)
        self.opt = self.make_optimizer()

    def make_optimizer(self) -> torch.optim.Optimizer | None:
        """D's own optimizer (alternating, reversal): Adam with GAN betas, or SGD with momentum."""
        g, params = self.cfg, self.discs.parameters()
        if g.d_optimizer == "adam":
            return torch.optim.Adam(params, lr=g.d_lr, betas=(0.5, 0.999), weight_decay=g.d_weight_decay,
                                    **fused_optimizer())
        return torch.optim.SGD(params, lr=g.d_lr, momentum=0.9, weight_decay=g.d_weight_decay, **fused_optimizer())

    def penalty(self) -> torch.Tensor | float:
        """d_l1 * sum |theta_D|: the L1 regularisation of D's weights (ANC's "L1" variant); L2 is d_weight_decay."""
        if self.cfg.d_l1 == 0:
            return 0.0
        return self.cfg.d_l1 * sum(m.weight.abs().sum() for d in self.discs.discs for m in d.linears)

    def student_groups(self, student_lr: float) -> list[dict]:
        return []

    def play(self, student: list[torch.Tensor], teacher: list[torch.Tensor], rows: int,
             weight: float = 1.0) -> Played:
        """`student`, `teacher`: one (B, D_g) float32 tensor per discriminator; `rows`: how many adversarial
        samples (ANC) to add, the first `rows` student vectors of the shuffled batch, labelled teacher;
        `weight`: the rank's shard weight on D's own backward (the student's is weighted by the caller)."""
        raise NotImplementedError

    def sync(self) -> None:
        """D's gradients averaged over the ranks (nothing with one process)."""
        average_gradients(self.discs.parameters(), self.world)

    def after_backward(self) -> None:
        pass

    def step(self) -> None:
        pass


def adversarial_samples(student: list[torch.Tensor], rows: int) -> list[torch.Tensor] | None:
    """ANC's adversarial samples: `rows` extra student vectors per D (the batch is shuffled, so its first rows
    are a random subset), detached: they regularise D only, the student's own rows carry its gradient."""
    return [s[:rows].detach() for s in student] if rows > 0 else None


class Alternating(Game):
    def play(self, student, teacher, rows, weight=1.0):
        detached = [s.detach() for s in student]
        d_loss, acc = discriminator_loss(self.discs, teacher, detached, adversarial_samples(student, rows))  # (G,)
        self.opt.zero_grad(set_to_none=True)
        objective = d_loss.sum() + self.penalty()
        (objective * weight if weight != 1.0 else objective).backward()
        self.sync()
        self.opt.step()  # D's turn, before the student's
        adv = self.weights * fooling_loss(self.discs, student)  # (G,), through the updated D held fixed
        return Played(adv, adv.sum(), d_loss.detach(), acc)


class Reversal(Game):
    def play(self, student, teacher, rows, weight=1.0):
        # D descends its loss, the student ascends weights[g] * it
        reversed_ = [grad_reverse(s, w) for s, w in zip(student, self.weight_values)]
        d_loss, acc = discriminator_loss(self.discs, teacher, reversed_, adversarial_samples(student, rows))
        self.opt.zero_grad(set_to_none=True)
        # reported: what the student effectively minimises
        return Played(-self.weights * d_loss.detach(), d_loss.sum() + self.penalty(), d_loss.detach(), acc)

    def step(self):
        self.sync()
        self.opt.step()


class Cooperative(Game):
    """The official MEAL / MEAL V2 code's game: total = student loss + sum_g eta_g * BCE_g, one SGD step over
    the student and the discriminators (D's group at d_lr, following the student's schedule, weight decay
    d_weight_decay). Both sides descend the BCE: the student helps D tell it apart from the teacher."""

    def make_optimizer(self):
        return None  # D trains inside the student's optimizer, on the summed loss

    def student_groups(self, student_lr):
        g = self.cfg
        # lr_scale: set_lr gives this group d_lr / lr times the student's scheduled rate, as the official
        # MultiStepLR scales every group of its one optimizer
        return [{"params": list(self.discs.parameters()), "lr": g.d_lr, "weight_decay": g.d_weight_decay,
                 "lr_scale": g.d_lr / student_lr}]

    def play(self, student, teacher, rows, weight=1.0):
        d_loss, acc = discriminator_loss(self.discs, teacher, student, adversarial_samples(student, rows))
        adv = self.weights * d_loss  # the student helps D
        return Played(adv, adv.sum() + self.penalty(), d_loss.detach(), acc)

    def after_backward(self):
        self.sync()  # D steps inside the student's optimizer


GAMES = {"alternating": Alternating, "reversal": Reversal, "cooperative": Cooperative}


def make_game(cfg: GameConfig | None, discs: Discriminators | None, weights: list[float] | None = None,
              world: World = World()) -> Game | None:
    """The game of `cfg` (None: no game) over `discs`, discriminator g weighing `weights[g]` (default 1)."""
    if cfg is None:
        return None
    return GAMES[cfg.adversarial](cfg, discs, [1.0] * len(discs) if weights is None else list(weights), world)
