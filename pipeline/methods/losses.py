"""The distillation losses, as plain functions of tensors (docs/design.md section 4).

- `similarity(s, t, kind)`: MEAL's per-output distance, `ce | l1 | l2 | kl`, between a student vector and
  a teacher vector of the same shape (aligned block features or logits); `ce` is the official default.
- `kd_loss`: Hinton's alpha * T^2 * KL(p_t || softmax(s/T)) + (1 - alpha) * CE(s, y).
- `soft_cross_entropy`: MEAL V2's loss against a soft target distribution, no one-hot labels.
- `grad_reverse`: identity forward, -scale * gradient backward (Ganin & Lempitsky), one way to play
  the adversarial game in a single backward pass.

Every loss returns a scalar float32 mean over the batch, whatever the autocast dtype of its inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIMILARITIES = ("ce", "l1", "l2", "kl")


def similarity(student: torch.Tensor, teacher: torch.Tensor, kind: str = "ce", temperature: float = 1.0) -> torch.Tensor:
    """Distance between `student` and `teacher` (B, D), a scalar float32.

    - `ce`, the official MEAL code's default (`--loss ce`, its loss.CrossEntropy): the soft cross-entropy
      -sum_d softmax(t/T)_d log softmax(s/T)_d per sample, averaged over the batch, times T^2 (T = 1
      officially). On pooled block vectors too: the softmax runs over the vector's D elements.
      Its minimum is the entropy of softmax(t/T), not 0.
    - `l1`: mean absolute difference over all elements (the official `--loss l1`, F.l1_loss).
    - `l2`: mean squared difference over all elements (the official `--loss l2`, F.mse_loss).
    - `kl`: KL(softmax(t/T) || softmax(s/T)) * T^2, summed over D, averaged over the batch: `ce` less the
      target's entropy (the same gradient), zero when the two are equal.
    """
    s, t = student.float(), teacher.float()
    if kind == "ce":
        return soft_cross_entropy(s / temperature, soften(t, temperature)) * temperature**2
    if kind == "l1":
        return (s - t).abs().mean()
    if kind == "l2":
        return (s - t).square().mean()
    if kind == "kl":
        return kl_divergence(soften(t, temperature), s / temperature) * temperature**2
    raise ValueError(f"unknown similarity {kind!r}; choose one of {', '.join(SIMILARITIES)}")


def soften(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T) over the last axis, in float32: (..., C) -> (..., C)."""
    return F.softmax(logits.float() / temperature, dim=-1)


def kl_divergence(target_probs: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(s)) summed over classes, averaged over the batch (0 log 0 counts as 0)."""
    return F.kl_div(F.log_softmax(student_logits.float(), dim=-1), target_probs.float(), reduction="batchmean")


def soft_cross_entropy(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """-sum_c p_c log softmax(s)_c, averaged over the batch (MEAL V2). Equals KL + H(p): its minimum is H(p)."""
    return -(target_probs.float() * F.log_softmax(student_logits.float(), dim=-1)).sum(-1).mean()


def kd_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hinton KD: (total, soft part, hard part).

    `teacher_probs` (B, C) is the teacher's softmax at temperature T already (`soften(t, T)`, or the
    mean of several teachers' softened outputs). The soft part is scaled by T^2 so its gradient keeps
    the same size whatever T (Hinton et al. 2015, section 2).
    """
    soft = kl_divergence(teacher_probs, student_logits.float() / temperature) * temperature**2
    hard = F.cross_entropy(student_logits.float(), labels)
    return alpha * soft + (1.0 - alpha) * hard, soft, hard


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by -scale on the way back.

    Put between the student's vector and a discriminator, one backward pass of the discriminator's
    loss trains the discriminator to separate and the student (scaled by `scale`) to confuse it.
    """
    return _GradReverse.apply(x, scale)
