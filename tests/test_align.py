"""Alignment pooling: the DESIGN.md formulas, any input shape, and a gradient in the activations' layout."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.align import AlignConfig, align
from pipeline.align_tap import GradientTap
from pipeline.config import UserError
from pipeline.models import build_model


def reference(x: torch.Tensor, kind: str, length: int) -> torch.Tensor:
    """DESIGN.md section 4, written the plain way (the official code's order of operations)."""
    if x.dim() == 2:
        x = x[:, :, None]
    x = x.flatten(2).float()  # (B, C, H*W)
    if kind == "meal":
        return F.adaptive_avg_pool1d(x, length).mean(dim=1)
    return F.adaptive_avg_pool1d(x.mean(dim=2)[:, None], length)[:, 0]


@pytest.mark.parametrize("kind", ["meal", "channel"])
@pytest.mark.parametrize("shape", [(4, 6, 7, 5), (3, 40, 4, 4), (2, 12)])
def test_align_matches_the_formula(kind, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).relu()
    for length in (8, 32):
        got = align(x, AlignConfig(kind, length))
        assert got.shape == (shape[0], length) and got.dtype == torch.float32
        torch.testing.assert_close(got, reference(x, kind, length), rtol=1e-5, atol=1e-6)
    if x.dim() == 4:  # the layout of the input must not change the vector
        cl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(align(cl, AlignConfig(kind, 8)), reference(x, kind, 8), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["meal", "channel"])
def test_align_gradient_keeps_channels_last(kind):
    """An NCHW gradient against channels_last activations slows every later backward op 2-3x on the CPU."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(4, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    block = torch.relu(conv(x))  # a block output: it feeds the next block and the alignment
    downstream = conv(block).square().sum()
    grad = torch.autograd.grad(align(block, AlignConfig(kind, 4)).sum() + downstream, block, retain_graph=True)[0]
    assert grad.is_contiguous(memory_format=torch.channels_last)
    expected = torch.autograd.grad(downstream, block)[0] + align_grad(kind, block.shape)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)


def align_grad(kind: str, shape) -> torch.Tensor:
    """d sum(align(x)) / dx by the reference formula."""
    x = torch.zeros(shape, requires_grad=True)
    reference(x, kind, 4).sum().backward()
    return x.grad


def test_bad_align_spec_is_one_line():
    with pytest.raises(UserError, match="alignment kind"):
        AlignConfig("max", 8)
    with pytest.raises(UserError, match="alignment length"):
        AlignConfig("channel", 0)


def student_grads(arch: str, kind: str, channels_last: bool, tapped: bool, width: float, device: str = "cpu"):
    """Parameter gradients of `logits.square().mean() + sum(vectors * weights)` for a zoo model used as student
    (on `device`)."""
    torch.manual_seed(0)
    model = build_model(arch, 10, 3, width=width).to(device)
    x = torch.randn(4, 3, 32, 32).to(device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    cfg = AlignConfig(kind, 8)
    logits, feats = model(x)
    weights = torch.randn(len(feats), 4, 8, generator=torch.Generator().manual_seed(1)).to(device)
    if tapped:  # the objective's gradients written out: 2 logits / n and the weights
        tap = GradientTap(cfg)
        vectors = tap.vectors(feats)
        tap.backward(logits, feats, 2.0 * logits.detach() / logits.numel(), weights)
    else:
        vectors = torch.stack([align(f, cfg) for f in feats])
        (logits.square().mean() + (vectors * weights).sum()).backward()
    return vectors.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch,width", [("student_cnn", 0.5), ("resnet8", 0.5), ("lenet4", 1.0),
                                        ("resnet18", 0.125), ("preact_resnet18", 0.125)])
@pytest.mark.parametrize("kind", ["channel", "meal"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_gradient_tap_equals_autograd_through_align(arch, width, kind, channels_last):
    """The student's tapped alignment: the vectors of align() per block, and the same parameter gradients
    as autograd through align(), for every zoo model a profile uses as student (the in-place add would
    corrupt a gradient some other node still held: this is the guard)."""
    vectors, grads = student_grads(arch, kind, channels_last, True, width)
    expected_vectors, expected = student_grads(arch, kind, channels_last, False, width)
    torch.testing.assert_close(vectors, expected_vectors, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected.keys()
    for name, g in grads.items():
        # float32 sums in another order (channels_last): agree to 1e-5 of each gradient's largest entry
        torch.testing.assert_close(g, expected[name], rtol=1e-4, atol=1e-5 * float(expected[name].abs().max()), msg=name)


def test_gradient_tap_rebuilds_its_matrix_for_new_shapes():
    tap = GradientTap(AlignConfig("channel", 8))
    a = tap.vectors([torch.rand(2, 12, 5, 5), torch.rand(2, 20, 3, 3)])
    assert a.shape == (2, 2, 8) and tap.matrix.shape == (32, 16)
    # channels_last block 1: 12 channels summed 4 positions per row (48-element rows); the 4 partial sums
    # of each channel are added before the product, so the matrix has one row per channel
    b = tap.vectors([torch.rand(2, 12, 28, 28).contiguous(memory_format=torch.channels_last)])
    assert b.shape == (1, 2, 8) and tap.layouts == [(4, 12, 784)] and tap.matrix.shape == (12, 8)
