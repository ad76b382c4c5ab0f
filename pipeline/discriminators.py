"""Discriminators that tell teacher vectors from student vectors, and the losses of the game.

One small MLP per distilled block (MEAL's stacked discriminators) or on the final outputs (MEAL V2,
ANC's logits variant): D -> D/2 -> D/4 -> 1 logit, no activation after the last layer (the official
MEAL code ends in a ReLU, which clips the "student" side of its logit to 0; we do not copy that).

The label convention: 1 = teacher, 0 = student. `sigmoid(D(v))` is D's "teacher" probability.

The three ways to play (chosen per method with `adversarial`, see pipeline.methods):
- `alternating` (the paper's game): D steps on `discriminator_loss` with the student's vectors
  detached, then the student steps on its own loss plus `fooling_loss` (non-saturating: make D say
  "teacher"). Two optimizers, D with its own learning rate.
- `reversal`: one backward pass of `discriminator_loss` with the student's vectors behind
  `grad_reverse`, so D descends and the student ascends D's loss (the minimax form). Two optimizers.
- `cooperative` (the official MEAL code): `discriminator_loss` is simply added to the student's loss
  under one optimizer; the student's gradient then *helps* D tell it apart from the teacher.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Discriminator(nn.Module):
    """(B, D) -> (B,) logit of "this vector came from a teacher"."""

    def __init__(self, dim: int):
        super().__init__()
        h1, h2 = max(1, dim // 2), max(1, dim // 4)
        # LeakyReLU rather than ReLU: with inputs this small (D = 10..64) dead units would leave D with
        # almost no capacity; the slope keeps a gradient flowing to the student through every unit.
        self.net = nn.Sequential(
            nn.Linear(dim, h1), nn.LeakyReLU(0.2),
            nn.Linear(h1, h2), nn.LeakyReLU(0.2),
            nn.Linear(h2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float())[:, 0]  # (B,)


def discriminator_loss(
    disc: Discriminator, teacher: torch.Tensor, student: torch.Tensor, adversarial_rows: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """D's binary cross-entropy on teacher (label 1) and student (label 0) vectors, and its accuracy.

    `teacher`, `student`: (B, D). The first `adversarial_rows` student rows are ANC's "adversarial
    samples": student vectors labelled as teacher, a regulariser that keeps D from winning outright
    (the batch is already shuffled, so the first rows are a random subset). Accuracy is always measured
    against the true labels, as a device scalar (no host sync).
    """
    d_t = disc(teacher)  # (B,)
    d_s = disc(student)  # (B,)
    target_s = torch.zeros_like(d_s)
    if adversarial_rows > 0:
        target_s[:adversarial_rows] = 1.0
    loss = 0.5 * (F.binary_cross_entropy_with_logits(d_t, torch.ones_like(d_t))
                  + F.binary_cross_entropy_with_logits(d_s, target_s))
    accuracy = 0.5 * ((d_t.detach() > 0).float().mean() + (d_s.detach() <= 0).float().mean())
    return loss, accuracy


def fooling_loss(disc: Discriminator, student: torch.Tensor) -> torch.Tensor:
    """The student's adversarial term in the alternating game: BCE(D(s), teacher), non-saturating."""
    d_s = disc(student)  # (B,)
    return F.binary_cross_entropy_with_logits(d_s, torch.ones_like(d_s))


def teacher_probability(disc: Discriminator, vectors: torch.Tensor) -> torch.Tensor:
    """Mean sigmoid(D(v)) over a batch: how "teacher" D finds these vectors (a diagnostic)."""
    with torch.no_grad():
        return torch.sigmoid(disc(vectors)).mean()
