"""Alignment ("adaptive pooling", MEAL section 3): any block output -> a fixed-length vector.

Teachers and students of different widths and resolutions are compared block by block through these
vectors, and the teacher cache stores them, so the pooling spec is part of a cache's identity.

- `meal`, what the official MEAL code does: (B, C, H*W) -> AdaptiveAvgPool1d(L) over the spatial
  axis -> mean over channels -> (B, L). It keeps a coarse spatial profile and discards channels.
- `channel`: global average pool over H, W -> (B, C) -> AdaptiveAvgPool1d(L) over channels -> (B, L).
  It keeps (groups of) channels and discards where they fired.

A 2-D block output (B, D) (e.g. a fully connected hidden layer) is treated as D channels of a 1x1 map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from typing import Callable

from pipeline.config import check, check_choice

POOLINGS = ("meal", "channel")


@dataclass
class AlignConfig:
    kind: str = "channel"  # meal | channel (see the module docstring)
    length: int = 32  # L, the length of every aligned vector (elements)

    def __post_init__(self) -> None:
        check_choice(self.kind, POOLINGS, "alignment kind")
        check(1 <= self.length <= 4096, f"alignment length = {self.length} must be between 1 and 4096")


def mean(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The mean over `dims`, accumulated in float32 (a sum and one division, as the trainer's layout-keeping
    mean computes it, so both give the same bits)."""
    return x.sum(dim=dims, dtype=torch.float32) / math.prod([x.shape[d] for d in dims])  # a list: the compiler traces no generators


Mean = Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]


def align(feature: torch.Tensor, cfg: AlignConfig, mean: Mean = mean) -> torch.Tensor:
    """(B, C, H, W) or (B, D) -> (B, L) float32. `mean`: how to average (the trainer passes
    pipeline.device.mean_keep_layout for an eager student, whose gradient keeps channels_last)."""
    x = feature if feature.dim() == 4 else feature[:, :, None, None]  # (B, C, H, W); (B, D) -> D channels, 1x1
    if cfg.kind == "meal":
        # mean over channels, then adaptive pooling over the spatial positions: both are averages along
        # different axes, so this equals the official order (pool the spatial axis, then mean channels)
        profile = mean(x, (1,)).flatten(1)  # (B, H*W)
        return F.adaptive_avg_pool1d(profile[:, None, :], cfg.length)[:, 0]  # (B, L)
    pooled = mean(x, (2, 3))  # (B, C)
    return F.adaptive_avg_pool1d(pooled[:, None, :], cfg.length)[:, 0]  # (B, L)


def align_all(features: list[torch.Tensor], cfg: AlignConfig) -> list[torch.Tensor]:
    return [align(f, cfg) for f in features]
