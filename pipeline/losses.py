"""The distillation losses, as plain functions of tensors (docs/design.md section 4).

- `similarity(s, t, kind)`: MEAL's per-block distance, `l1 | l2 | kl`, between a student vector and a
  teacher vector of the same shape (aligned block features or logits).
- `kd_loss`: Hinton's alpha * T^2 * KL(p_t || softmax(s/T)) + (1 - alpha) * CE(s, y).
- `soft_cross_entropy`: MEAL V2's loss against a soft target distribution, no one-hot labels.
- `grad_reverse`: identity forward, -scale * gradient backward (Ganin & Lempitsky), one way to play
  the adversarial game in a single backward pass.

Every loss returns a scalar float32 mean over the batch, whatever the autocast dtype of its inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIMILARITIES = ("l1", "l2", "kl")


def similarity(student: torch.Tensor, teacher: torch.Tensor, kind: str = "l2", temperature: float = 1.0,
               groups: bool = False) -> torch.Tensor:
    """Distance between `student` and `teacher` (B, D): zero when they are equal.

    - `l1`: mean absolute difference over all elements.
    - `l2`: mean squared difference over all elements (nn.MSELoss; the official MEAL default).
    - `kl`: KL(softmax(t/T) || softmax(s/T)) * T^2 per sample, averaged over the batch; the softmax
      runs over the last axis, so on block features it compares the normalised activation profiles.

    `groups`: the inputs are (G, B, D), G independent pairs (MEAL's blocks), and the result is (G,),
    each entry what the (B, D) call on that pair returns.
    """
    s, t = student.float(), teacher.float()
    dims = (-2, -1) if groups else tuple(range(s.dim()))
    if kind == "l1":
        return (s - t).abs().mean(dims)
    if kind == "l2":
        return (s - t).square().mean(dims)
    if kind == "kl":
        if groups:  # per pair: summed over D, averaged over B, as kl_div's batchmean
            log_q = F.log_softmax(s / temperature, dim=-1)
            p = soften(t, temperature)
            return F.kl_div(log_q, p, reduction="none").sum(-1).mean(-1) * temperature**2
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
