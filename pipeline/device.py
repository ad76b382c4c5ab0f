"""Device selection and the speed tricks, each named here with the test that holds it to its plain form.

    autocast()          bf16 on CUDA, float32 on the CPU            tests/test_methods.py, tests/test_cuda.py
    memory_format()     channels_last activations                   tests/test_align.py, tests/test_cuda.py
    fused_optimizer()   one kernel per parameter tensor             tests/test_device.py
    setup_cpu()         threads; denormals flushed to zero          tests/test_device.py
    bounded_heap()      big buffers mmapped, returned on free       tests/test_device.py (files source only)
    mean_keep_layout()  a mean whose gradient stays channels_last   tests/test_align.py

pipeline.distill.build_trainer is the one place a training step picks among them (docs/design.md section 5).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from pipeline.config import UserError, check_choice


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present; asking for `cuda` without one is a one-line UserError."""
    check_choice(name, ("auto", "cpu", "cuda"), "--device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full fp32 on the CPU (CPU bf16 is slower than fp32 on most hosts)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last everywhere: tensor cores on CUDA; on the CPU oneDNN's NHWC convolutions train small CNNs
    faster than NCHW."""
    return torch.channels_last


def fused_optimizer() -> dict[str, bool]:
    """Optimizer kwargs: torch's public fused kernels (one kernel per parameter tensor instead of a
    Python-driven loop of small ops), on CUDA and on the CPU alike."""
    return {"fused": True}


def setup_cpu(files: bool = False) -> None:
    """Per-process CPU settings every stage starts with.

    Threads: every core the machine gives us unless the user pinned OMP_NUM_THREADS.
    Denormals flushed to zero (FTZ/DAZ): late in training some magnitudes fall below 1.2e-38, where x86
    arithmetic slows down many times over; numbers that small carry nothing a network can learn from.
    `files` (data.source: files): `bounded_heap`.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    torch.set_flush_denormal(True)
    if files:
        bounded_heap()


def bounded_heap(threshold: int = 1 << 20) -> bool:
    """glibc: every allocation over `threshold` bytes gets its own mapping, unmapped when freed. By default glibc
    raises that threshold to the largest block freed so far (up to 32 MiB); batches that DataLoader workers
    hand over and a prefetch thread normalises are then carved from the heap and freed on another thread, and
    the heap kept what they left: a cache pass from files grew with the number of batches (bench.files).
    A fixed threshold keeps the memory flat. Returns False where there is no glibc (nothing changes)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt(-3, threshold) == 1  # M_MMAP_THRESHOLD; setting it also stops its adjustment
    except (OSError, AttributeError):
        return False


class _MeanKeepLayout(torch.autograd.Function):
    """Mean over `dims`, accumulated in float32, whose gradient is written in the input's memory format.

    A plain mean's backward is a broadcast view with zero strides; where it meets the gradient of the
    next layer, autograd's sum comes out NCHW, and every later ReLU/BatchNorm/conv backward of a
    channels_last network then runs slower on the CPU. Writing the broadcast out in the activations'
    layout costs one pass and keeps the backward in channels_last.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        ctx.dims, ctx.shape, ctx.dtype = dims, x.shape, x.dtype
        ctx.count = math.prod(x.shape[d] for d in dims)
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        ctx.layout = torch.channels_last if channels_last else torch.contiguous_format
        return x.sum(dim=dims, dtype=torch.float32) / ctx.count

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        for d in sorted(ctx.dims):
            grad = grad.unsqueeze(d)
        out = torch.empty(ctx.shape, dtype=ctx.dtype, device=grad.device, memory_format=ctx.layout)
        return out.copy_((grad / ctx.count).expand(ctx.shape)), None


def mean_keep_layout(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Speed trick: `pipeline.align.mean(x, dims)` (the same value, float32) with a gradient in `x`'s memory
    format. For eager training only: a custom Function splits a torch.compile graph, and the compiler
    picks its own layouts anyway (pipeline.distill.build_trainer chooses). Evidence: bench/results/
    cpu-fastpath_ab.json (MEAL's CPU step with and without it); tests/test_align.py checks it against
    the plain mean."""
    return _MeanKeepLayout.apply(x, tuple(dims))
