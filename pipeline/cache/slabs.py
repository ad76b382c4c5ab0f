"""Where a training step's teacher targets come from: cached view slabs in memory, or live teachers.

Cached (the product): each epoch e shows view v = e mod V, and `EpochReads` says which rows of that view each
part of the epoch needs. Under `distill.shuffle: full` the epoch is one part: `SlabLoader` reads the slab `[:, v]`
of every needed array of every teacher cache into memory once (onto the GPU on CUDA), and reads the next epoch's
slab in a background thread meanwhile. Under `shuffle: chunks` each part is a window's worth of steps (the order
keeps the window's samples in a few chunks, pipeline.training.epoch_order): the loader reads the next part's chunks
while this part trains, keeping the last part's chunks for the steps that straddle two windows, so each chunk is
read once an epoch and memory holds a few windows whatever the number of samples. Steps gather their rows with
in-memory indexing either way: a store is never indexed per minibatch, where a random batch read from zarr/HDF5
costs orders of magnitude more than the same gather in memory (docs/design.md section 3).

Online (`--online`, the speed baseline and the cache's oracle): `OnlineTargets` runs the teachers
live on the very pixels the student sees, aligns their features with the cache's spec and casts
through fp16, so a step gets targets in exactly the cached format.

Both hand the loop a `pipeline.methods.Targets`: logits (k, B, C) and aligned block vectors
[(k, B, L_g) per feature block], float32, for the k teachers the method picked this step.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
import torch
import torch.nn as nn

from pipeline.align import AlignConfig, align
from pipeline.device import memory_format
from pipeline.methods import Targets
from pipeline.mix import MixPlan, fkd_targets, partner_rows


class SlabSource(Protocol):
    """Per-teacher view slabs: `read(v, names, rows)` -> one dict per teacher of {"logits": (n, C), "<block>":
    (n, L)} fp16, for every sample (rows None, n = N) or the sorted sample indexes `rows` (a rank's share)."""

    teachers: list[str]
    blocks: list[str]
    num_views: int
    num_samples: int  # N
    chunk_rows: int  # R: samples per stored chunk, the unit a read of some rows costs

    def read(self, view: int, names: Sequence[str], rows: np.ndarray | None = None) -> list[dict[str, np.ndarray]]: ...


class CacheSlabs:
    """Slabs from opened teacher caches (`pipeline.cache.TeacherCache`), one contiguous read per array."""

    def __init__(self, caches: dict):
        first = next(iter(caches.values()))
        self.caches = caches
        self.teachers = list(caches)
        self.blocks = list(first.blocks)
        self.num_views = int(first.num_views)
        self.num_samples, self.chunk_rows = int(first.num_samples), int(first.layout.chunk_rows)

    def read(self, view: int, names: Sequence[str], rows: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
        out = []
        for cache in self.caches.values():
            out.append(cache.view_slab(view, names, rows))  # {"logits": (n, C), "<block>": (n, L)} fp16
        return out


class ArraySlabs:
    """Slabs from whole in-memory arrays (N, V, ...) per teacher: tests and benchmarks without a store."""

    def __init__(self, teachers: list[str], arrays: list[dict[str, np.ndarray]], blocks: list[str],
                 chunk_rows: int = 0):
        self.teachers, self.arrays, self.blocks = list(teachers), arrays, list(blocks)
        self.num_views = int(arrays[0]["logits"].shape[1])
        self.num_samples = int(arrays[0]["logits"].shape[0])
        self.chunk_rows = chunk_rows or self.num_samples

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
    held: torch.Tensor | None = None  # (n,) int64 sorted: the samples whose rows these are, when the slab holds
    # some rows only (a rank's share, a part of the epoch); None when row i is sample i

    def local(self, idx: torch.Tensor) -> torch.Tensor:
        """Sample indexes (B,) -> their rows here (each must be held)."""
        return idx if self.held is None else torch.searchsorted(self.held, idx)

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


@dataclass
class EpochReads:
    """Which teacher rows an epoch's steps need, part by part, and what to read ahead for the next epoch."""

    view: int  # the view this epoch shows
    parts: list[tuple[int, np.ndarray | None]]  # (first step, the sorted samples its steps train on this rank, or
    # None: every sample), in step order; a part lasts until the next one's first step
    ahead: tuple[int, np.ndarray | None] | None = None  # the next epoch's (view, first part's rows); None: last epoch

    @classmethod
    def whole(cls, view: int, next_view: int | None = None, rows: np.ndarray | None = None) -> "EpochReads":
        """One part: view `view` (of `rows` only, if given), reading view `next_view` (all of it) ahead."""
        return cls(view, [(0, rows)], None if next_view is None else (next_view, None))


class SlabLoader:
    """Loads slabs of the arrays a method needs; `prefetch(v, rows)` reads the next one in a thread.

    `get(v)` reads the whole view; `get(v, rows)` the sorted samples `rows`. With `by_chunk`, a read of some rows
    reads their whole chunks and keeps the chunks of the last read for the next (whose first steps share them).
    """

    def __init__(self, source: SlabSource, feature_blocks: Sequence[int], device: torch.device,
                 by_chunk: bool = False):
        self.source, self.device, self.by_chunk = source, device, by_chunk
        self.feature_blocks = tuple(feature_blocks)
        self.names = ["logits"] + [source.blocks[b] for b in self.feature_blocks]
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slab-prefetch")
        self.pending: dict[Any, Future] = {}
        self.current: Slab | None = None
        self.current_key = None
        self.kept: dict[tuple[int, int], np.ndarray] = {}  # (view, chunk) -> (K, r, W) its rows: the last read's
        self.chunk_reads = 0  # chunks read from the source (by_chunk): what "once an epoch" is checked against
        self.widths: list[int] = []  # [C, L_1, ...] of the arrays read, once one has been

    def _stack(self, per_teacher: list[dict[str, np.ndarray]]) -> np.ndarray:
        """One dict per teacher -> rows (K, n, C + sum L), fp16; notes the widths [C, L_1, ...]."""
        self.widths = [int(per_teacher[0][k].shape[1]) for k in self.names]
        return np.stack([np.concatenate([t[k] for k in self.names], axis=1) for t in per_teacher]).astype(
            np.float16, copy=False)

    def _chunked(self, view: int, rows: np.ndarray) -> np.ndarray:
        """Rows (K, n, W) of the samples `rows`, from whole chunks: the last read's where it had them."""
        r, n = self.source.chunk_rows, self.source.num_samples
        chunks = np.unique(rows // r)
        kept = {}
        for k in chunks.tolist():
            got = self.kept.get((view, k))
            if got is None:
                got = self._stack(self.source.read(view, self.names, np.arange(k * r, min(n, k * r + r))))
                self.chunk_reads += 1
            kept[(view, k)] = got
        self.kept = kept  # (view, chunk) -> (K, r, W): only this read's chunks stay
        where = np.searchsorted(chunks, rows // r)
        return np.concatenate([kept[(view, int(chunks[i]))][:, rows[(where == i)] - int(chunks[i]) * r]
                               for i in range(len(chunks))], axis=1)  # rows are sorted: chunk by chunk

    def _read(self, view: int, rows: np.ndarray | None) -> tuple[torch.Tensor, list[int]]:
        """Runs in the background thread: disk read + decode, stacked over teachers into rows (K, n, C + sum L)
        (pinned on CUDA); also returns the widths [C, L_1, ...]."""
        if self.by_chunk and rows is not None:
            stacked = self._chunked(view, rows)
        else:
            stacked = self._stack(self.source.read(view, self.names, rows))
        host = torch.from_numpy(stacked)
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host, list(self.widths)

    @staticmethod
    def _key(view: int, rows: np.ndarray | None):
        """A slab's name: its view, and which rows when it holds some only."""
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
        held = None
        if rows is not None:  # which samples the rows are: copied like the rows, without a host sync on CUDA
            held = torch.from_numpy(rows)
            held = (held.pin_memory() if self.device.type == "cuda" else held).to(self.device, non_blocking=True)
        self.current = Slab(view, host.to(self.device, non_blocking=True), widths[0], self.feature_blocks,
                            tuple(widths[1:]), held)
        self.current_key = key
        return self.current

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class NoTargets:
    """The target source of a method that reads no teacher (scratch): it is never asked for targets."""

    def start_epoch(self, reads: EpochReads) -> None:
        pass

    def at_step(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class CachedTargets:
    """Targets gathered from the current part's slab by sample index: no store access inside the step loop."""

    def __init__(self, loader: SlabLoader):
        self.loader = loader
        self.slab: Slab | None = None
        self.reads: EpochReads | None = None
        self.part = -1

    def start_epoch(self, reads: EpochReads) -> None:
        self.reads, self.part = reads, -1
        self.at_step(0)

    def at_step(self, step: int) -> None:
        """Before step `step`: on a part's first step, its slab in place and the next part read ahead."""
        parts = self.reads.parts
        if self.part + 1 >= len(parts) or step < parts[self.part + 1][0]:
            return
        self.part += 1
        self.slab = self.loader.get(self.reads.view, parts[self.part][1])
        ahead = (self.reads.view, parts[self.part + 1][1]) if self.part + 1 < len(parts) else self.reads.ahead
        if ahead is not None:
            self.loader.prefetch(*ahead)

    def __call__(self, idx: torch.Tensor, x: torch.Tensor, picked: list[int]) -> Targets:
        """`idx` (B,) sample indexes on the device; `x` unused (the cache already saw these pixels)."""
        s = self.slab
        idx = s.local(idx)  # (B,) rows of this slab
        if len(picked) == s.rows.shape[0]:
            rows = s.rows[:, idx]  # (K, B, C + sum L)
        elif len(picked) == 1:
            rows = s.rows[picked[0]][idx][None]  # (1, B, C + sum L): MEAL's one teacher per step
        else:
            rows = s.rows[picked][:, idx]
        return Targets(*s.split(rows.float()))  # (k, B, C), [(k, B, L_g) per feature block]

    def close(self) -> None:
        self.loader.close()


class FkdTargets(CachedTargets):
    """FKD's approximation of a mixed view's targets (distill.mix_targets: fkd), from whole-view slabs of the
    plan's unmixed views: the sample's and its partner's targets mixed by lambda (pipeline.mix.fkd_targets) at
    the method's temperature. Where the teachers saw the mixed image, CachedTargets reads it directly."""

    def __init__(self, loader: SlabLoader, mix: MixPlan, temperature: float):
        super().__init__(loader)
        self.mix, self.temperature = mix, temperature  # (N, V, ...) torch on the device

    def __call__(self, idx: torch.Tensor, x: torch.Tensor, picked: list[int]) -> Targets:
        pairs = self.mix.take(idx, self.reads.view)  # (B, ...) this view's pairs
        own = super().__call__(idx, x, picked)
        other = super().__call__(partner_rows(pairs, idx), x, picked)
        return Targets(*fkd_targets(own.logits, other.logits, own.blocks, other.blocks, pairs.lam, self.temperature))


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

    def start_epoch(self, reads: EpochReads) -> None:
        pass

    def at_step(self, step: int) -> None:
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
