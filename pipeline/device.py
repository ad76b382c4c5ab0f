"""Device selection and the per-device speed settings (bf16 autocast on CUDA, channels_last)."""

from __future__ import annotations

import contextlib
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
    """channels_last everywhere: on CUDA for tensor cores, and on this AVX2 CPU oneDNN's NHWC convolutions
    trained small CNNs 1.5-2x faster than NCHW (measured: a 147k-parameter VGG at 2,005 vs 1,271 img/s)."""
    return torch.channels_last


def setup_threads() -> None:
    """Use every core the machine gives us unless the user pinned OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
