"""Alignment ("adaptive pooling", MEAL section 3): any block output -> a fixed-length vector.

Teachers and students of different widths and resolutions are compared block by block through these
vectors, and the teacher cache stores them, so the pooling spec is part of a cache's identity.

- `meal`, the official MEAL code with `--pool_out avg` (its README's recipes): (B, C, H*W) ->
  AdaptiveAvgPool1d(L) over the spatial axis -> mean over channels -> (B, L). It keeps a coarse spatial
  profile and discards channels.
- `meal_max`, the official code's default `--pool_out max`: AdaptiveMaxPool1d(L) over the spatial axis
  -> max over channels -> (B, L).
- `channel`, ours and no MEAL pooling: global average pool over H, W -> (B, C) -> AdaptiveAvgPool1d(L)
  over channels -> (B, L). It keeps (groups of) channels and discards where they fired; it ties student
  channel i to teacher channel group i by index, which a discriminator can exploit.

`length` is one L for every block or one per block (the official `--out_dims`); an L above the block's
H*W repeats positions, as the official adaptive pooling does.

A 2-D block output (B, D) (e.g. a fully connected hidden layer) is treated as D channels of a 1x1 map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from typing import Callable

from pipeline.config import check, check_choice

POOLINGS = ("meal", "meal_max", "channel")


@dataclass
class AlignConfig:
    kind: str = "channel"  # meal | meal_max | channel (see the module docstring)
    length: int | list[int] = 32  # L (elements): one for every block, or a list with one per block (out_dims)

    def __post_init__(self) -> None:
        check_choice(self.kind, POOLINGS, "alignment kind")
        lengths = self.length if isinstance(self.length, list) else [self.length]
        check(len(lengths) >= 1 and all(isinstance(n, int) and 1 <= n <= 65536 for n in lengths),
              f"alignment length = {self.length} must be an integer between 1 and 65536, or a list of them")

    def lengths(self, blocks: int) -> list[int]:
        """The vector length of each of `blocks` blocks."""
        if not isinstance(self.length, list):
            return [self.length] * blocks
        check(len(self.length) == blocks, f"alignment length = {self.length} lists {len(self.length)} lengths "
                                          f"for {blocks} blocks: give one per block, or one number")
        return list(self.length)


def mean(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The mean over `dims`, accumulated in float32 (a sum and one division, as the trainer's layout-keeping
    mean computes it, so both give the same bits)."""
    return x.sum(dim=dims, dtype=torch.float32) / math.prod([x.shape[d] for d in dims])  # a list: the compiler traces no generators


Mean = Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]


def align(feature: torch.Tensor, cfg: AlignConfig, mean: Mean = mean, length: int | None = None) -> torch.Tensor:
    """(B, C, H, W) or (B, D) -> (B, L) float32, L = `length` (default: cfg.length when it is one number).
    `mean`: how to average (the trainer passes pipeline.device.mean_keep_layout for an eager student,
    whose gradient keeps channels_last)."""
    length = cfg.length if length is None else length
    x = feature if feature.dim() == 4 else feature[:, :, None, None]  # (B, C, H, W); (B, D) -> D channels, 1x1
    if cfg.kind == "meal_max":
        # the max over channels commutes with the max over each spatial window: reduce channels first
        profile = x.float().amax(dim=1).flatten(1)  # (B, H*W)
        return F.adaptive_max_pool1d(profile[:, None, :], length)[:, 0]  # (B, L)
    if cfg.kind == "meal":
        # mean over channels, then adaptive pooling over the spatial positions: both are averages along
        # different axes, so this equals the official order (pool the spatial axis, then mean channels)
        profile = mean(x, (1,)).flatten(1)  # (B, H*W)
        return F.adaptive_avg_pool1d(profile[:, None, :], length)[:, 0]  # (B, L)
    pooled = mean(x, (2, 3))  # (B, C)
    return F.adaptive_avg_pool1d(pooled[:, None, :], length)[:, 0]  # (B, L)


def align_all(features: list[torch.Tensor], cfg: AlignConfig) -> list[torch.Tensor]:
    return [align(f, cfg, length=n) for f, n in zip(features, cfg.lengths(len(features)))]
