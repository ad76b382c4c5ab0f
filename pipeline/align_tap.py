"""The student's aligned block vectors with their gradient tapped into the blocks' gradients (GradientTap).

pipeline.align maps one block output to its vector, and the teacher caches are written with it. The
student needs the same vectors of its G distilled blocks on every step, and their gradient. Through
autograd that gradient is the broadcast of each mean, written out in full and added to the gradient the
next layer sends back: on this CPU, with block 1 of the default student at 12 channels x 28 x 28 (4.8 MB
a step at batch 128), those passes cost more than the rest of MEAL's block similarities together. Here:
- the vectors come from the detached blocks' sums and one product with a block-diagonal (sum D_g, G*L)
  matrix that holds adaptive_avg_pool1d's bins and the mean's division (built from adaptive_avg_pool1d
  itself, so the bins are the same);
- on channels_last activations the sums and the gradient's add run over (B, HW/k, k*C) views, k positions
  per row, so the innermost axis is long enough to vectorise (block 1: 73 against 148 us for the sum,
  127 against 385 us for a broadcast add, measured alone);
- the gradient is added in place into the gradient each block already receives (one pass, no new tensor).
Measured in lock-step on this CPU (2 threads, batch 128, two runs), MEAL's block similarities cost
1.8-2.0 ms a step through autograd and 1.1-1.3 ms tapped.

The tap builds no graph at all: the caller (pipeline.distill.train_step) computes the gradient of its
objective with respect to the vectors and the logits in closed form (pipeline.methods.Plan.loss_grads)
and hands both to `backward`.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.nn.functional as F

from pipeline.align import AlignConfig

_MIN_ROW = 48  # elements: the shortest innermost row the k-position views aim for (AVX2: 6 vectors of 8)


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _positions_per_row(hw: int, c: int) -> int:
    """k: the smallest divisor of H*W with k*C >= _MIN_ROW (1 when C alone is long enough)."""
    for k in range(1, hw + 1):
        if hw % k == 0 and k * c >= _MIN_ROW:
            return k
    return hw


def _layout(x: torch.Tensor, kind: str) -> tuple[int, int, int]:
    """How `_reduce` sums block output `x`: (k positions per row of its channels_last view, width of its
    sums, elements summed into each)."""
    if x.dim() == 2:
        return (1, int(x.shape[1]), 1) if kind == "channel" else (1, 1, int(x.shape[1]))
    _, c, h, w = (int(n) for n in x.shape)
    if kind == "meal":
        return 1, h * w, c
    k = _positions_per_row(h * w, c) if _channels_last(x) else 1
    return k, c, h * w


def _reduce(x: torch.Tensor, kind: str, k: int) -> torch.Tensor:
    """A block output (B, C, H, W) or (B, D) -> its sums, float32: (B, C) spatial sums (`channel`) or
    (B, H*W) channel sums (`meal`); the pooling matrix bins them and divides."""
    if x.dim() == 2:
        return x.float() if kind == "channel" else x.sum(1, keepdim=True, dtype=torch.float32)
    b, c, h, w = x.shape
    if _channels_last(x):
        rows = x.permute(0, 2, 3, 1)  # (B, H, W, C), contiguous
        if kind == "meal":
            return rows.reshape(b, h * w, c).sum(2, dtype=torch.float32)
        sums = rows.reshape(b, h * w // k, k * c).sum(1, dtype=torch.float32)  # (B, k*C): index j*C + c
        # the k partial sums of each channel added here, on (B, k*C), so the pooling product runs on
        # (B, C): with them left in, the product was 5.5x the work and cost ~0.1 ms a step here
        return sums.view(b, k, c).sum(1) if k > 1 else sums
    if kind == "meal":
        return x.sum(1, dtype=torch.float32).view(b, h * w)
    return x.reshape(b, c, h * w).sum(2, dtype=torch.float32)


def pool_matrix(layouts: list[tuple[int, int, int]], length: int) -> torch.Tensor:
    """(sum of the sums' widths, G*L): block g's sums -> its L adaptive-average bins, block-diagonal.

    Built from adaptive_avg_pool1d itself (so the bins are the same), each block's rows divided by the
    elements summed into each value: the mean's division is folded in, and the same matrix transposed
    carries the gradient back to the sums."""
    out = torch.zeros(sum(width for _, width, _ in layouts), len(layouts) * length)
    row = 0
    for g, (_, width, count) in enumerate(layouts):
        bins = F.adaptive_avg_pool1d(torch.eye(width)[:, None, :], length)[:, 0]  # (D, L): row i = bins of e_i
        out[row:row + width, g * length:(g + 1) * length] = bins / count
        row += width
    return out


def _add_broadcast(grad: torch.Tensor, u: torch.Tensor, kind: str, k: int) -> torch.Tensor:
    """`grad` (the gradient of a block output) += the gradient of `_reduce`'s sums `u` (B, W), in place.

    One pass over `grad` in its own layout: on channels_last through the same k-positions-per-row view
    as `_reduce` (`u` repeated k times along the row), whose innermost rows are long enough to vectorise.
    The gradient may come back in another layout than the block had (a flatten's backward is NCHW)."""
    u = u.to(grad.dtype)
    if grad.dim() == 2:
        return grad.add_(u)  # channel: D values, one each; meal: u (B, 1) over all D
    b, c, h, w = grad.shape
    if _channels_last(grad):
        rows = grad.permute(0, 2, 3, 1)  # (B, H, W, C) contiguous
        if kind == "meal":
            rows.view(b, h * w, c).add_(u[:, :, None])
        else:
            rows.view(b, h * w // k, k * c).add_((u.repeat(1, k) if k > 1 else u)[:, None, :])  # (B, k*C)
    elif grad.is_contiguous():
        flat = grad.view(b, c, h * w)
        flat.add_(u[:, None, :] if kind == "meal" else u[:, :, None])
    else:
        grad.add_(u.view(b, 1, h, w) if kind == "meal" else u[:, :, None, None])
    return grad


class GradientTap:
    """The student's aligned vectors of its distilled blocks, (G, B, L), whose gradient is *tapped* into
    the blocks' own gradients instead of flowing back through autograd.

    Through autograd the gradient of a spatial mean is a broadcast that is written out in full and then
    added to the gradient the next block sends back: two extra passes over block 1's activations (4.8 MB
    a step for the default student) and a fresh tensor each. Here the vectors are computed from the
    detached blocks, without a graph; `backward` takes the objective's gradient with respect to the
    vectors and to the logits, carries the former back to the blocks' sums through the pooling matrix's
    transpose, then runs the student's backward from the logits with a hook on each block that adds its
    sums' gradient into the block's gradient in place (one pass, no allocation). The result is the same
    gradient (tests/test_align.py compares it with autograd through pipeline.align for every student of
    the zoo).

    The hooks see a block's gradient only where the student's own layers use the block tensor it
    returned: an eager student, not a torch.compile'd one. The in-place add needs that gradient not to
    be shared with another node, true of every zoo student (each block feeds a conv, a pooling or a
    linear layer, whose backward writes a fresh tensor); the test guards it.
    """

    def __init__(self, cfg: AlignConfig):
        self.cfg = cfg
        self.matrix: torch.Tensor | None = None
        self.layouts: list[tuple[int, int, int]] = []  # the blocks' _layout the matrix was built for

    def _build(self, feats: list[torch.Tensor]) -> None:
        layouts = [_layout(f, self.cfg.kind) for f in feats]
        if self.matrix is None or layouts != self.layouts or self.matrix.device != feats[0].device:
            self.matrix = pool_matrix(layouts, self.cfg.length).to(feats[0].device)
            self.layouts = layouts

    def vectors(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """[(B, C, H, W) or (B, D)] * G -> (G, B, L) float32 vectors = torch.stack([align(f) ...]), without a graph."""
        self._build(feats)
        kind = self.cfg.kind
        device = feats[0].device.type
        # under bf16 autocast the product stays in float32 (entering a context costs a step ~20 us: only then)
        plain = torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()
        with torch.no_grad(), plain:
            sums = torch.cat([_reduce(f, kind, k) for f, (k, _, _) in zip(feats, self.layouts)], 1)  # (B, W)
            pooled = torch.mm(sums, self.matrix)  # (B, G*L)
        return pooled.view(pooled.shape[0], len(feats), self.cfg.length).transpose(0, 1)

    def backward(self, logits: torch.Tensor, feats: list[torch.Tensor], g_logits: torch.Tensor,
                 g_vectors: torch.Tensor | None) -> None:
        """The student's backward for an objective whose gradient is `g_logits` (B, C) with respect to its
        logits and `g_vectors` (G, B, L) with respect to `vectors(feats)` (None: no block term)."""
        if g_vectors is not None:
            g, b = g_vectors.shape[0], g_vectors.shape[1]
            flat = g_vectors.transpose(0, 1).reshape(b, g * self.cfg.length)  # (B, G*L)
            g_sums = torch.mm(flat, self.matrix.t())  # (B, W): the pooling's transpose carries it back
            for f, u, (k, _, _) in zip(feats, g_sums.split([width for _, width, _ in self.layouts], 1), self.layouts):
                f.register_hook(partial(_add_broadcast, u=u, kind=self.cfg.kind, k=k))
        # every block reaches the logits through the student's later layers, so this reaches every hook
        logits.backward(g_logits.to(logits.dtype))
