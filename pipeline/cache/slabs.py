"""Where a training step's teacher targets come from: cached view slabs in memory, or live teachers.

Cached (the product): each epoch e shows view v = e mod V. `SlabLoader` reads the slab `[:, v]` of
every needed array of every teacher cache into memory once (onto the GPU on CUDA) and reads the next
epoch's slab in a background thread meanwhile; steps then gather their rows with in-memory indexing.
A store is never indexed per minibatch: a random batch read from zarr/HDF5 costs orders of magnitude
more than the same gather in memory (docs/design.md section 3).

Online (`--online`, the speed baseline and the cache's oracle): `OnlineTargets` runs the teachers
live on the very pixels the student sees, aligns their features with the cache's spec and casts
through fp16, so a step gets targets in exactly the cached format.

Both hand the loop a `pipeline.methods.Targets`: logits (k, B, C) and aligned block vectors
[(k, B, L_g) per feature block], float32, for the k teachers the method picked this step.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn as nn

from pipeline.align import AlignConfig, align
from pipeline.device import memory_format
from pipeline.methods import Targets


class SlabSource(Protocol):
    """Per-teacher view slabs: `read(v, names, rows)` -> one dict per teacher of {"logits": (n, C), "<block>":
    (n, L)} fp16, for every sample (rows None, n = N) or the sorted sample indexes `rows` (a rank's share)."""

    teachers: list[str]
    blocks: list[str]
    num_views: int

    def read(self, view: int, names: Sequence[str], rows: np.ndarray | None = None) -> list[dict[str, np.ndarray]]: ...


class CacheSlabs:
    """Slabs from opened teacher caches (`pipeline.cache.TeacherCache`), one contiguous read per array."""

    def __init__(self, caches: dict):
        first = next(iter(caches.values()))
        self.caches = caches
        self.teachers = list(caches)
        self.blocks = list(first.blocks)
        self.num_views = int(first.num_views)

    def read(self, view: int, names: Sequence[str], rows: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
        out = []
        for cache in self.caches.values():
            out.append(cache.view_slab(view, names, rows))  # {"logits": (n, C), "<block>": (n, L)} fp16
        return out


class ArraySlabs:
    """Slabs from whole in-memory arrays (N, V, ...) per teacher: tests and benchmarks without a store."""

    def __init__(self, teachers: list[str], arrays: list[dict[str, np.ndarray]], blocks: list[str]):
        self.teachers, self.arrays, self.blocks = list(teachers), arrays, list(blocks)
        self.num_views = int(arrays[0]["logits"].shape[1])

    def read(self, view: int, names: Sequence[str], rows: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
        pick = slice(None) if rows is None else rows
        return [{k: np.ascontiguousarray(a[k][pick, view]).astype(np.float16) for k in names} for a in self.arrays]


@dataclass
class Slab:
    """One view of every teacher, stacked: on the training device, fp16.

    Each sample's logits and aligned block vectors sit side by side in one row, so a step gathers its
    targets with one indexing op rather than one per array (and per teacher).
    """

    view: int
    rows: torch.Tensor  # (K, n, C + sum L_g): logits, then the G feature blocks' vectors
    classes: int  # C
    feature_blocks: tuple[int, ...]  # the G block indexes, in row order
    lengths: tuple[int, ...]  # L_g, each feature block's vector length, in row order
    local: torch.Tensor | None = None  # (N,) int64: sample index -> its row here (-1: not held), when the slab
    # holds a rank's rows only; None when row i is sample i

    @property
    def logits(self) -> torch.Tensor:
        return self.rows[..., :self.classes]  # (K, N, C)

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """(..., C + sum L_g) rows -> (logits (..., C), [(..., L_g) per feature block] or None)."""
        parts = rows.split([self.classes, *self.lengths], dim=-1)
        return parts[0], (list(parts[1:]) if self.feature_blocks else None)

    @property
    def features(self) -> dict[int, torch.Tensor]:
        """Block index -> (K, N, L_g) view of its vectors."""
        _, blocks = self.split(self.rows)
        return dict(zip(self.feature_blocks, blocks or []))


class SlabLoader:
    """Loads view slabs of the arrays a method needs; `prefetch(v)` reads the next one in a thread."""

    def __init__(self, source: SlabSource, feature_blocks: Sequence[int], device: torch.device):
        self.source, self.device = source, device
        self.feature_blocks = tuple(feature_blocks)
        self.names = ["logits"] + [source.blocks[b] for b in self.feature_blocks]
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slab-prefetch")
        self.pending: dict[int, Future] = {}
        self.current: Slab | None = None
        self.current_key = None

    def _read(self, view: int, rows: np.ndarray | None) -> tuple[torch.Tensor, list[int]]:
        """Runs in the background thread: disk read + decode, stacked over teachers into rows (K, n, C + sum L)
        (pinned on CUDA); also returns the widths [C, L_1, ...]."""
        per_teacher = self.source.read(view, self.names, rows)
        rows = np.stack([np.concatenate([t[k] for k in self.names], axis=1) for t in per_teacher])
        host = torch.from_numpy(rows.astype(np.float16, copy=False))
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host, [int(per_teacher[0][k].shape[1]) for k in self.names]

    @staticmethod
    def _key(view: int, rows: np.ndarray | None):
        """A slab's name: its view, and which rows when it holds a rank's share."""
        return view if rows is None else (view, hash(rows.tobytes()))

    def prefetch(self, view: int, rows: np.ndarray | None = None) -> None:
        """Start reading `view` (only the sorted sample indexes `rows`, if given) in the background."""
        key = self._key(view, rows)
        if key not in self.pending and (self.current is None or self.current_key != key):
            self.pending[key] = self.pool.submit(self._read, view, rows)

    def get(self, view: int, rows: np.ndarray | None = None) -> Slab:
        """The slab of `view` (of `rows`) on the device (waits for its prefetch if one is under way)."""
        key = self._key(view, rows)
        if self.current is not None and self.current_key == key:
            return self.current
        self.prefetch(view, rows)
        host, widths = self.pending.pop(key).result()
        self.current = None  # drop the old slab before keeping the new one
        local = None
        if rows is not None:  # sample index -> row of this rank's slab
            local = torch.full((int(rows[-1]) + 1,), -1, dtype=torch.int64)  # a rank's batches index only its rows
            local[torch.from_numpy(rows)] = torch.arange(len(rows))
            local = local.to(self.device)
        self.current = Slab(view, host.to(self.device, non_blocking=True), widths[0], self.feature_blocks,
                            tuple(widths[1:]), local)
        self.current_key = key
        return self.current

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class NoTargets:
    """The target source of a method that reads no teacher (scratch): it is never asked for targets."""

    def start_epoch(self, view: int, next_view: int | None, rows=None, next_rows=None) -> None:
        pass

    def close(self) -> None:
        pass


class CachedTargets:
    """Targets gathered from the epoch's slab by sample index: no store access inside the step loop."""

    def __init__(self, loader: SlabLoader):
        self.loader = loader
        self.slab: Slab | None = None

    def start_epoch(self, view: int, next_view: int | None, rows: np.ndarray | None = None,
                    next_rows: np.ndarray | None = None) -> None:
        """`rows`, `next_rows`: the sorted samples this rank trains in this epoch and the next (None: all)."""
        self.slab = self.loader.get(view, rows)
        if next_view is not None:
            self.loader.prefetch(next_view, next_rows)

    def __call__(self, idx: torch.Tensor, x: torch.Tensor, picked: list[int]) -> Targets:
        """`idx` (B,) sample indexes on the device; `x` unused (the cache already saw these pixels)."""
        s = self.slab
        if s.local is not None:
            idx = s.local[idx]  # (B,) rows of this rank's slab
        if len(picked) == s.rows.shape[0]:
            rows = s.rows[:, idx]  # (K, B, C + sum L)
        elif len(picked) == 1:
            rows = s.rows[picked[0]][idx][None]  # (1, B, C + sum L): MEAL's one teacher per step
        else:
            rows = s.rows[picked][:, idx]
        return Targets(*s.split(rows.float()))  # (k, B, C), [(k, B, L_g) per feature block]

    def close(self) -> None:
        self.loader.close()


class OnlineTargets:
    """Targets from the frozen teachers run live on the student's batch, in the cached format."""

    def __init__(self, teachers: list[nn.Module], align_cfg: AlignConfig, feature_blocks: Sequence[int],
                 device: torch.device, use_autocast: bool = False):
        fmt = memory_format(device)
        self.teachers = [t.eval().requires_grad_(False).to(device=device, memory_format=fmt) for t in teachers]
        self.align_cfg, self.feature_blocks, self.device = align_cfg, tuple(feature_blocks), device
        # The cache computes in fp32 unless `cache.autocast` (bf16 on CUDA): do what it does, so the
        # online targets are the cache's oracle rather than a slightly different computation.
        self.use_autocast = use_autocast and device.type == "cuda"

    def start_epoch(self, view: int, next_view: int | None, rows=None, next_rows=None) -> None:
        pass

    @torch.no_grad()
    def __call__(self, idx: torch.Tensor, x: torch.Tensor, picked: list[int]) -> Targets:
        """`x` (B, C, H, W): the normalised view the student sees. Only the picked teachers run."""
        logits, vectors = [], []
        for k in picked:
            with torch.autocast("cuda", torch.bfloat16, enabled=self.use_autocast):
                out, blocks = self.teachers[k](x)
            logits.append(out.float().half())  # (B, C): the cache stores fp16
            lengths = self.align_cfg.lengths(len(blocks))
            vectors.append([align(blocks[b], self.align_cfg, length=lengths[b]).half()
                            for b in self.feature_blocks])  # (B, L_b) each
        stacked = [torch.stack(v).float() for v in zip(*vectors)] if self.feature_blocks else None  # (k, B, L_g) each
        return Targets(torch.stack(logits).float(), stacked)

    def close(self) -> None:
        pass
