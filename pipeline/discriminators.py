"""Discriminators that tell teacher vectors from student vectors, and the losses of the game.

One small MLP per distilled block (MEAL's stacked discriminators) or on the final outputs (MEAL V2):
D -> D/2 -> D/4 -> 1 logit, LeakyReLU between, no activation after the last layer (the official MEAL
code ends in a ReLU, which clips the "student" side of its logit to 0; we do not copy that).
The label convention: 1 = teacher, 0 = student; `sigmoid(D(v))` is D's "teacher" probability.
pipeline.methods.games plays the game with these losses.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

SLOPE = 0.2  # LeakyReLU's negative slope in every hidden layer


class Discriminators(nn.Module):
    """G discriminators of the same input size D, one per name, run as one batched MLP.

    (G, N, D) -> (G, N) logits of "this vector came from a teacher". Group g is exactly the MLP
    D -> D/2 -> D/4 -> 1 with its own weights (initialised as nn.Linear initialises); the G of them run
    as three `baddbmm` calls, so MEAL's per-block discriminators cost one small MLP's launches, not G.
    All weights and biases live in one parameter, `flat` (one tensor for the optimizer to step);
    `layers()` gives them per layer as views.
    """

    def __init__(self, names: list[str], dim: int):
        super().__init__()
        self.names = list(names)
        self._labels: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # per batch layout, see `labels`
        widths = [dim, max(1, dim // 2), max(1, dim // 4), 1]
        tensors = []
        for d_in, d_out in zip(widths[:-1], widths[1:]):
            layers = [nn.Linear(d_in, d_out) for _ in self.names]
            tensors.append(torch.stack([m.weight.detach().t() for m in layers]))  # (G, in, out)
            tensors.append(torch.stack([m.bias.detach()[None] for m in layers]))  # (G, 1, out)
        self.shapes = [t.shape for t in tensors]  # w1, b1, w2, b2, w3, b3
        self.flat = nn.Parameter(torch.cat([t.flatten() for t in tensors]))

    def layers(self, flat: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(weight (G, in, out), bias (G, 1, out))] per layer, as views of `flat` (default: the parameters;
        pass `flat.grad` for the gradients). Differentiable when grad mode is on."""
        parts = (self.flat if flat is None else flat).split([math.prod(shape) for shape in self.shapes])
        views = [p.view(shape) for p, shape in zip(parts, self.shapes)]
        return list(zip(views[0::2], views[1::2]))

    @property
    def widths(self) -> list[int]:
        return [int(shape[2]) for shape in self.shapes[0::2]]

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """`x` (G, N, D) -> (G, N). `frozen`: no gradient reaches the weights (the student's turn)."""
        layers = self.layers(self.flat.detach() if frozen else None)
        h = x.float()
        for i, (w, b) in enumerate(layers):
            h = torch.baddbmm(b, h, w)  # (G, N, out)
            if i < len(layers) - 1:
                # LeakyReLU rather than ReLU: with inputs this small (D = 10..64) dead units would leave D
                # with almost no capacity; the slope keeps a gradient flowing to the student through every unit.
                h = F.leaky_relu(h, SLOPE)
        return h[..., 0]

    def labels(self, n: int, teachers: int, adversarial_rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(truth (n,) bool: the teacher rows, sign (n,) float: 1 - 2 * target, the target 1 for the teacher
        rows and the adversarial rows), made once per batch layout: a tensor made on every step from host
        values is a host-to-device copy, a sync on CUDA."""
        key = (n, teachers, adversarial_rows, device)
        if key not in self._labels:
            rows = torch.arange(n, device=device)
            target = (rows < teachers + adversarial_rows).float()
            self._labels[key] = (rows < teachers, 1.0 - 2.0 * target)
        return self._labels[key]


def discriminator_loss(
    discs: Discriminators, teacher: torch.Tensor, student: torch.Tensor, adversarial_rows: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each D's binary cross-entropy on teacher (label 1) and student (label 0) vectors, and its accuracy.

    `teacher`, `student`: (G, B, D). Returns (loss (G,), accuracy (G,)). The first `adversarial_rows`
    student rows are ANC's "adversarial samples": student vectors labelled as teacher, a regulariser
    that keeps D from winning outright (the batch is already shuffled, so the first rows are a random
    subset). Accuracy is always measured against the true labels, on the device (no host sync).
    """
    logits = discs(torch.cat([teacher, student], dim=1))  # (G, 2B): one pass over both sides
    truth, sign = discs.labels(logits.shape[1], teacher.shape[1], adversarial_rows, logits.device)  # (2B,) each
    loss = F.softplus(logits * sign).mean(1)  # BCE(x, y) = softplus((1 - 2y) x) for y in {0, 1}
    accuracy = ((logits.detach() > 0) == truth).float().mean(1)  # both sides weigh the same
    return loss, accuracy


def fooling_loss(discs: Discriminators, student: torch.Tensor) -> torch.Tensor:
    """The student's adversarial term in the alternating game: BCE(D(s), teacher), non-saturating.

    `student` (G, B, D) float32 -> (G,). D's weights are held fixed: the gradient reaches the student only.
    """
    return F.softplus(-discs(student, frozen=True)).mean(1)  # BCE with label 1 is softplus(-logit)


def teacher_probability(discs: Discriminators, vectors: torch.Tensor) -> torch.Tensor:
    """Mean sigmoid(D(v)) per discriminator over a batch (G, B, D) -> (G,): how "teacher" D finds them."""
    with torch.no_grad():
        return torch.sigmoid(discs(vectors)).mean(1)
