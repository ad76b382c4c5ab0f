"""Discriminators that tell teacher vectors from student vectors, and the losses of the game.

One small MLP per discriminated output (MEAL: each selected block and the logits; MEAL V2: the final
outputs; ANC: the last block), each D -> D/r -> D/r^2 -> K with the width reduction r (`d_reduction`: 2, or
MEAL V2's 8 on ImageNet's 1,000 classes: 1000 -> 125 -> 15 -> 2, each division floored as the official code's),
of one of two kinds (`discriminator`):

- `mlp`, ours: LeakyReLU between the layers, no activation after the last, K = 1 logit of "teacher";
  BCE on that logit.
- `official`, the MEAL and MEAL V2 code's (models/discriminator.py): 1x1 convolutions, which on a vector
  are linear layers, with a ReLU after every layer including the last, K = 2 columns; BCE with logits
  on both columns against [1, 0] for student rows and [0, 1] for teacher rows. The final ReLU clips
  both columns at 0, so a side whose two columns are both clipped gives D no gradient.

The label convention: "teacher" = 1, "student" = 0. D says "teacher" when its logit is > 0 (`mlp`)
or when the teacher column exceeds the student column (`official`); a tie is half right in its accuracy.
pipeline.methods.games plays the game with these losses.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import check_choice

KINDS = ("mlp", "official")
SLOPE = 0.2  # LeakyReLU's negative slope in every hidden layer of the `mlp` kind


class Discriminator(nn.Module):
    """One discriminator: (N, D) -> (N, K) scores, D -> D/r -> D/r^2 -> K (K = 1 `mlp`, 2 `official`)."""

    def __init__(self, linears: list[nn.Linear], kind: str):
        super().__init__()
        self.linears, self.kind = nn.ModuleList(linears), kind

    @staticmethod
    def widths(dim: int, kind: str, reduction: int = 2) -> list[int]:
        hidden = max(1, dim // reduction)
        return [dim, hidden, max(1, hidden // reduction), 1 if kind == "mlp" else 2]

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """`frozen`: no gradient reaches the weights (the student's turn of the alternating game)."""
        h = x.float()
        last = len(self.linears) - 1
        for i, m in enumerate(self.linears):
            w, b = (m.weight.detach(), m.bias.detach()) if frozen else (m.weight, m.bias)
            h = F.linear(h, w, b)  # (N, out)
            if self.kind == "official":
                h = F.relu(h)  # after every layer, the last included, as the official code
            elif i < last:
                # LeakyReLU rather than ReLU: with inputs this small (D = 10..64) dead units would leave D
                # with almost no capacity; the slope keeps a gradient flowing to the student through every unit.
                h = F.leaky_relu(h, SLOPE)
        return h

    def row_bce(self, scores: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Per-row binary cross-entropy (N,) of `scores` (N, K) against `teacher` (N,) float labels in {0, 1}."""
        if self.kind == "mlp":
            return F.softplus(scores[:, 0] * (1.0 - 2.0 * teacher))  # BCE(x, y) = softplus((1 - 2y) x)
        target = torch.stack([1.0 - teacher, teacher], dim=1)  # (N, 2): [1, 0] student, [0, 1] teacher
        return F.binary_cross_entropy_with_logits(scores, target, reduction="none").mean(1)

    def margin(self, scores: torch.Tensor) -> torch.Tensor:
        """(N,) D's "teacher" margin per row: > 0 says teacher, < 0 student, 0 is a tie (the official kind's
        ReLU ties often: both columns clipped to 0)."""
        return scores[:, 0] if self.kind == "mlp" else scores[:, 1] - scores[:, 0]


class Discriminators(nn.Module):
    """One Discriminator per name, each with its own input size: `dims` name -> D.

    The linear layers are made layer by layer across the discriminators (first layers of every D, then
    the second layers...), each initialised as nn.Linear initialises (as nn.Conv2d with a 1x1 kernel does).
    """

    def __init__(self, dims: dict[str, int], kind: str = "mlp", reduction: int = 2):
        super().__init__()
        check_choice(kind, KINDS, "discriminator")
        self.names, self.kind = list(dims), kind
        widths = {name: Discriminator.widths(d, kind, reduction) for name, d in dims.items()}
        layers: dict[str, list[nn.Linear]] = {name: [] for name in dims}
        for i in range(3):
            for name in self.names:
                layers[name].append(nn.Linear(widths[name][i], widths[name][i + 1]))
        self.discs = nn.ModuleList(Discriminator(layers[name], kind) for name in self.names)

    def __len__(self) -> int:
        return len(self.discs)


def discriminator_loss(discs: Discriminators, teacher: list[torch.Tensor], student: list[torch.Tensor],
                       adversarial: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each D's binary cross-entropy on teacher (label 1) and student (label 0) vectors, and its accuracy.

    `teacher`, `student`: one (B, D_g) tensor per discriminator. `adversarial`: ANC's adversarial samples,
    extra student vectors (A, D_g) per discriminator shown to D labelled "teacher", added to its batch.
    The loss is the mean over all 2B (+ A) rows. Returns (loss (G,), accuracy (G,)); the accuracy is on the
    2B true rows, both sides weighing the same, a tie counting as half right (a coin flip: a dead D reads
    0.5, one that separates with one column while the other is clipped reads what it separates), on the
    device (no host sync).
    """
    losses, accs = [], []
    for g, d in enumerate(discs.discs):
        t, s = teacher[g], student[g]
        rows = [t, s] + ([adversarial[g]] if adversarial is not None else [])
        scores = d(torch.cat(rows))  # (2B + A, K): one pass over every row
        b, n = len(t), sum(len(r) for r in rows)
        label = torch.ones(n, device=scores.device)
        label[b:2 * b] = 0.0  # the student rows; the adversarial rows, after them, keep "teacher"
        losses.append(d.row_bce(scores, label).mean())
        signed = d.margin(scores[:2 * b].detach()) * (2.0 * label[:2 * b] - 1.0)  # > 0 right, 0 a tie
        accs.append(((signed > 0).float() + 0.5 * (signed == 0).float()).mean())
    return torch.stack(losses), torch.stack(accs)


def fooling_loss(discs: Discriminators, student: list[torch.Tensor]) -> torch.Tensor:
    """The student's adversarial term in the alternating game: BCE(D(s), teacher), non-saturating.

    `student`: (B, D_g) per discriminator -> (G,). D's weights are held fixed: the gradient reaches the
    student only.
    """
    out = []
    for d, s in zip(discs.discs, student):
        scores = d(s, frozen=True)
        out.append(d.row_bce(scores, torch.ones(len(s), device=scores.device)).mean())
    return torch.stack(out)


def teacher_probability(discs: Discriminators, vectors: list[torch.Tensor]) -> torch.Tensor:
    """How "teacher" each D finds a batch, (G,): mean sigmoid(logit) (`mlp`), or the mean share of the
    teacher column in softmax over the two columns (`official`)."""
    with torch.no_grad():
        out = []
        for d, v in zip(discs.discs, vectors):
            scores = d(v)
            p = torch.sigmoid(scores[:, 0]) if d.kind == "mlp" else torch.softmax(scores, 1)[:, 1]
            out.append(p.mean())
        return torch.stack(out)
