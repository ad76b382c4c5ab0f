"""Alignment pooling: the formulas of docs/design.md section 4, any input shape, and the layout-keeping mean
(the speed trick of section 5) against the plain one."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.align import AlignConfig, align
from pipeline.align import mean as plain_mean
from pipeline.config import UserError
from pipeline.device import mean_keep_layout


def reference(x: torch.Tensor, kind: str, length: int) -> torch.Tensor:
    """docs/design.md section 4, written the plain way (the official code's order of operations)."""
    if x.dim() == 2:
        x = x[:, :, None]
    x = x.flatten(2).float()  # (B, C, H*W)
    if kind == "meal":  # the official models/*.py with --pool_out avg
        return F.adaptive_avg_pool1d(x, length).mean(dim=1)
    if kind == "meal_max":  # the official default --pool_out max: max-pool the positions, then max over channels
        return F.adaptive_max_pool1d(x, length).max(dim=1)[0]
    return F.adaptive_avg_pool1d(x.mean(dim=2)[:, None], length)[:, 0]


@pytest.mark.parametrize("kind", ["meal", "meal_max", "channel"])
@pytest.mark.parametrize("shape", [(4, 6, 7, 5), (3, 40, 4, 4), (2, 12)])
def test_align_matches_the_formula(kind, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).relu()
    for length in (8, 32, 100):  # 100 > H*W: adaptive pooling repeats positions, as the official out_dims do
        got = align(x, AlignConfig(kind, length))
        assert got.shape == (shape[0], length) and got.dtype == torch.float32
        torch.testing.assert_close(got, reference(x, kind, length), rtol=1e-5, atol=1e-6)
    if x.dim() == 4:  # the layout of the input must not change the vector
        cl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(align(cl, AlignConfig(kind, 8)), reference(x, kind, 8), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["meal", "channel"])
def test_layout_keeping_mean_equals_the_plain_mean_and_keeps_channels_last(kind):
    """The speed trick against its plain form: the same vectors bit for bit, the same gradient, in channels_last
    (an NCHW gradient against channels_last activations slows every later backward op on the CPU)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(4, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    block = torch.relu(conv(x))  # a block output: it feeds the next block and the alignment
    downstream = conv(block).square().sum()
    cfg = AlignConfig(kind, 4)
    assert torch.equal(align(block, cfg, mean_keep_layout), align(block, cfg))
    grads = [torch.autograd.grad(align(block, cfg, m).sum() + downstream, block, retain_graph=True)[0]
             for m in (mean_keep_layout, plain_mean)]
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    expected = torch.autograd.grad(downstream, block)[0] + align_grad(kind, block.shape)
    for grad in grads:
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


def test_one_length_per_block():
    """The official `--out_dims`: each block pooled to its own length."""
    from pipeline.align import align_all

    cfg = AlignConfig("meal", [16, 8, 4])
    feats = [torch.rand(2, 4, 8, 8), torch.rand(2, 8, 4, 4), torch.rand(2, 16, 2, 2)]
    out = align_all(feats, cfg)
    assert [v.shape for v in out] == [(2, 16), (2, 8), (2, 4)]
    for v, f, n in zip(out, feats, (16, 8, 4)):
        torch.testing.assert_close(v, reference(f, "meal", n))
    with pytest.raises(UserError, match="one per block"):
        cfg.lengths(2)
    with pytest.raises(UserError, match="alignment length"):
        AlignConfig("meal", [16, 0, 4])
