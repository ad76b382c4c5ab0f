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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.config import check, check_choice

POOLINGS = ("meal", "channel")


@dataclass
class AlignConfig:
    kind: str = "channel"  # meal | channel (see the module docstring)
    length: int = 32  # L, the length of every aligned vector (elements)

    def __post_init__(self) -> None:
        check_choice(self.kind, POOLINGS, "alignment kind")
        check(1 <= self.length <= 4096, f"alignment length = {self.length} must be between 1 and 4096")


def align(feature: torch.Tensor, cfg: AlignConfig) -> torch.Tensor:
    """(B, C, H, W) or (B, D) -> (B, L) float32."""
    x = feature.float()
    if x.dim() == 2:
        x = x[:, :, None]  # (B, D, 1): D channels, one position
    else:
        x = x.flatten(2)  # (B, C, H*W)
    if cfg.kind == "meal":
        return F.adaptive_avg_pool1d(x, cfg.length).mean(dim=1)  # (B, L)
    pooled = x.mean(dim=2)  # (B, C)
    return F.adaptive_avg_pool1d(pooled[:, None, :], cfg.length)[:, 0]  # (B, L)


def align_all(features: list[torch.Tensor], cfg: AlignConfig) -> list[torch.Tensor]:
    return [align(f, cfg) for f in features]
