"""The losses: zero where they must be, the right value where it is known, and gradient reversal."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.methods.losses import grad_reverse, kd_loss, kl_divergence, similarity, soft_cross_entropy, soften


@pytest.mark.parametrize("kind", ["l1", "l2", "kl"])
def test_similarity_of_identical_inputs_is_zero(kind):
    x = torch.randn(8, 16)
    assert similarity(x, x.clone(), kind).item() == pytest.approx(0.0, abs=1e-6)
    assert similarity(x, 2 * x, kind).item() > 0


def test_similarity_values():
    s, t = torch.zeros(2, 4), torch.ones(2, 4)
    assert similarity(s, t, "l1").item() == pytest.approx(1.0)
    assert similarity(s, 2 * t, "l2").item() == pytest.approx(4.0)
    # kl against a uniform student: log C - H(p)
    t = torch.tensor([[2.0, 0.0, 0.0]])
    p = F.softmax(t, -1)
    expected = math.log(3) + (p * p.log()).sum().item()
    assert similarity(torch.zeros(1, 3), t, "kl").item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):
        similarity(s, t, "cosine")


def test_kd_soft_part_is_zero_for_identical_logits():
    logits = torch.randn(16, 10)
    labels = torch.randint(0, 10, (16,))
    total, soft, hard = kd_loss(logits, soften(logits, 4.0), labels, temperature=4.0, alpha=0.7)
    assert soft.item() == pytest.approx(0.0, abs=1e-6)
    assert hard.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert total.item() == pytest.approx(0.3 * hard.item(), rel=1e-5)
    # alpha = 1: pure distillation, the labels do not matter
    total, _, _ = kd_loss(logits, soften(logits, 2.0), labels, temperature=2.0, alpha=1.0)
    assert total.item() == pytest.approx(0.0, abs=1e-6)


def test_kd_soft_part_is_scaled_by_t_squared():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.zeros(4, dtype=torch.long)
    _, soft, _ = kd_loss(s, soften(t, 3.0), y, temperature=3.0, alpha=1.0)
    assert soft.item() == pytest.approx(9.0 * kl_divergence(soften(t, 3.0), s / 3.0).item(), rel=1e-6)


def test_soft_cross_entropy_minimum_is_the_target_entropy():
    t = torch.randn(6, 10)
    p = F.softmax(t, -1)
    entropy = -(p * p.log()).sum(-1).mean()
    assert soft_cross_entropy(t, p).item() == pytest.approx(entropy.item(), rel=1e-5)
    assert soft_cross_entropy(torch.randn(6, 10), p).item() > entropy.item()
    # with a one-hot target it is the ordinary cross-entropy
    y = torch.randint(0, 10, (6,))
    assert soft_cross_entropy(t, F.one_hot(y, 10).float()).item() == pytest.approx(F.cross_entropy(t, y).item(), rel=1e-5)


def test_grad_reverse_is_identity_forward_and_negates_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    y = grad_reverse(x, 0.5)
    assert torch.equal(y, x)
    (y * torch.arange(4.0)).sum().backward()
    assert torch.allclose(x.grad, -0.5 * torch.arange(4.0).expand(3, 4))


def test_losses_are_float32_scalars_from_bf16_inputs():
    s = torch.randn(4, 10).bfloat16()
    t = torch.randn(4, 10).bfloat16()
    for kind in ("ce", "l1", "l2", "kl"):
        out = similarity(s, t, kind)
        assert out.dtype == torch.float32 and out.dim() == 0


def test_ce_similarity_is_the_official_soft_cross_entropy_on_pooled_vectors():
    """MEAL's official `--loss ce` (loss.CrossEntropy): -(log_softmax(s) * softmax(t)).sum(1).mean(), at T = 1,
    applied to a pooled block vector just as to the logits; the other official options are F.l1_loss, F.mse_loss."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 32, generator=g), torch.randn(5, 32, generator=g) * 3  # (B, L) pooled vectors
    official = -(F.log_softmax(s, dim=1) * F.softmax(t, dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(similarity(s, t, "ce"), official)
    torch.testing.assert_close(similarity(s, t, "l1"), F.l1_loss(s, t))
    torch.testing.assert_close(similarity(s, t, "l2"), F.mse_loss(s, t))
    # ce minus the target's entropy is kl: the same gradient in the student
    entropy = -(F.softmax(t, 1) * F.log_softmax(t, 1)).sum(1).mean()
    torch.testing.assert_close(similarity(s, t, "ce") - entropy, similarity(s, t, "kl"))
    # at T: the softmax of both at T, times T^2
    at_t = -(F.log_softmax(s / 4, dim=1) * F.softmax(t / 4, dim=1)).sum(dim=1).mean() * 16
    torch.testing.assert_close(similarity(s, t, "ce", 4.0), at_t)
