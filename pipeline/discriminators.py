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


class Discriminators(nn.Module):
    """G discriminators of the same input size D, one per name, run as one batched MLP.

    (G, N, D) -> (G, N) logits of "this vector came from a teacher". Group g is exactly the MLP
    D -> D/2 -> D/4 -> 1 with its own weights (initialised as nn.Linear initialises); batching the G
    of them into three `baddbmm` calls makes MEAL's per-block discriminators cost one small MLP's
    launch overhead instead of G (on the CPU that overhead, not the arithmetic, is the whole cost).
    """

    def __init__(self, names: list[str], dim: int):
        super().__init__()
        self.names = list(names)
        widths = [dim, max(1, dim // 2), max(1, dim // 4), 1]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for d_in, d_out in zip(widths[:-1], widths[1:]):
            layers = [nn.Linear(d_in, d_out) for _ in self.names]
            self.weights.append(nn.Parameter(torch.stack([m.weight.detach().t() for m in layers])))  # (G, in, out)
            self.biases.append(nn.Parameter(torch.stack([m.bias.detach()[None] for m in layers])))  # (G, 1, out)

    @property
    def widths(self) -> list[int]:
        return [int(w.shape[2]) for w in self.weights]

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """`x` (G, N, D) -> (G, N). `frozen`: no gradient reaches the weights (the student's turn)."""
        h = x.float()
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if frozen:
                w, b = w.detach(), b.detach()
            h = torch.baddbmm(b, h, w)  # (G, N, out)
            if i < last:
                # LeakyReLU rather than ReLU: with inputs this small (D = 10..64) dead units would leave D
                # with almost no capacity; the slope keeps a gradient flowing to the student through every unit.
                h = F.leaky_relu(h, 0.2)
        return h[..., 0]


def discriminator_loss(
    discs: Discriminators, teacher: torch.Tensor, student: torch.Tensor, adversarial_rows: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each D's binary cross-entropy on teacher (label 1) and student (label 0) vectors, and its accuracy.

    `teacher`, `student`: (G, B, D). Returns (loss (G,), accuracy (G,)). The first `adversarial_rows`
    student rows are ANC's "adversarial samples": student vectors labelled as teacher, a regulariser
    that keeps D from winning outright (the batch is already shuffled, so the first rows are a random
    subset). Accuracy is always measured against the true labels, on the device (no host sync).
    """
    b = teacher.shape[1]
    logits = discs(torch.cat([teacher, student], dim=1))  # (G, 2B): one pass over both sides
    target = torch.zeros_like(logits)
    target[:, :b + adversarial_rows] = 1.0
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)  # (G,)
    truth = torch.zeros_like(logits, dtype=torch.bool)
    truth[:, :b] = True
    accuracy = ((logits.detach() > 0) == truth).float().mean(1)  # (G,): both sides weigh the same
    return loss, accuracy


def fooling_loss(discs: Discriminators, student: torch.Tensor) -> torch.Tensor:
    """The student's adversarial term in the alternating game: BCE(D(s), teacher), non-saturating.

    `student` (G, B, D) -> (G,). D's weights are held fixed: the gradient reaches the student only.
    """
    d_s = discs(student, frozen=True)  # (G, B)
    return F.binary_cross_entropy_with_logits(d_s, torch.ones_like(d_s), reduction="none").mean(1)


def teacher_probability(discs: Discriminators, vectors: torch.Tensor) -> torch.Tensor:
    """Mean sigmoid(D(v)) per discriminator over a batch (G, B, D) -> (G,): how "teacher" D finds them."""
    with torch.no_grad():
        return torch.sigmoid(discs(vectors)).mean(1)
