"""The self-check that reruns the teacher: does the store hold what the teacher computes on the planned views?

    recompute_check(store, checkpoint, plan, data, count)   -> RecomputeReport

Checksums (`--verify`) say the bytes are the ones written; they cannot say the bytes mean what the store's
identity claims. This check draws `count` (sample, view) pairs at random among the written chunks, replays
their views from the view plan (the memory source's tensor replay or the file source's decode, the very code
the cache pass runs), runs the teacher of `checkpoint` on them and compares its logits and aligned blocks with
the stored ones. A store whose views came from another augmentation or decoder, or whose numbers came from
other weights, differs by far more than fp16 rounding.

The tolerance is relative to each stored row's largest magnitude: 1% for a store computed in fp32 (fp16
storage rounds at about 0.05%, and batch composition moves fp32 results by far less), 5% for one computed under
bf16 autocast on a GPU (bf16 keeps 8 bits of mantissa, and the recomputed batch is not the cached one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.align import AlignConfig
from pipeline.augment import normalize
from pipeline.data import pair_views
from pipeline.cache.read import open_cache
from pipeline.cache.write import load_checked_teacher, teacher_outputs
from pipeline.config import build
from pipeline.device import memory_format

TOLERANCE = {"fp32": 0.01, "bf16-autocast": 0.05}  # the store's `compute` attr -> largest relative error allowed


@dataclass
class RecomputeReport:
    pairs: np.ndarray  # (n, 2) the (sample, view) pairs checked
    worst: dict[str, float]  # array name -> its largest relative error over the pairs
    tolerance: float
    bad: list[tuple[int, int, str, float]] = field(default_factory=list)  # (sample, view, array, error) over it

    @property
    def ok(self) -> bool:
        return not self.bad


def pick_pairs(done: np.ndarray, chunk_rows: int, num_samples: int, num_views: int, count: int,
               seed: int) -> np.ndarray:
    """`count` distinct (sample, view) pairs (fewer if fewer are written), uniformly among the written chunks'."""
    rows = np.concatenate([np.arange(k * chunk_rows, min(num_samples, (k + 1) * chunk_rows))
                           for k in np.flatnonzero(done)] or [np.zeros(0, dtype=np.int64)])
    total = len(rows) * num_views
    flat = np.random.default_rng(seed).choice(total, size=min(count, total), replace=False)
    return np.stack([rows[flat // num_views], flat % num_views], axis=1).astype(np.int64)  # (n, 2)


def recompute_check(store: str | Path, checkpoint: str | Path, plan, data, count: int, device: torch.device,
                    seed: int = 0, batch_size: int = 64) -> RecomputeReport:
    """Rerun the teacher on `count` random written (sample, view) pairs of `store` and compare (module doc)."""
    with open_cache(store) as cache:
        layout, teacher = cache.layout, cache.teacher
        align_cfg = build(AlignConfig, cache.align, f"align spec of {cache.path}")
        use_autocast = cache.attrs.get("compute") == "bf16-autocast" and device.type == "cuda"
        tolerance = TOLERANCE.get(cache.attrs.get("compute"), TOLERANCE["fp32"])
        pairs = pick_pairs(cache.done, layout.chunk_rows, layout.num_samples, layout.num_views, count, seed)
        pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]  # sample-major: reads in store order
        stored = {name: cache.pair_rows(name, pairs) for name in layout.widths()}  # (n, W) each as stored
    model, _ = load_checked_teacher(Path(checkpoint), teacher, plan, data, device)
    model.to(memory_format=memory_format(device))
    fresh: dict[str, list[np.ndarray]] = {name: [] for name in stored}
    fmt = memory_format(device)
    for x in pair_views(data, plan, pairs, device, batch_size):  # as the cache pass made them (mixed too)
        x = normalize(x, data.mean, data.std).contiguous(memory_format=fmt)
        for name, value in zip(stored, teacher_outputs(model, x, align_cfg, use_autocast, layout.topk)):
            fresh[name].append(value)
    report = RecomputeReport(pairs, {}, tolerance)
    for name, want in stored.items():
        got = np.concatenate(fresh[name]).astype(np.float32)
        want = np.asarray(want, dtype=np.float32)  # (n, W)
        scale = np.abs(want).max(axis=1) + 1e-6  # (n,) each row's largest stored magnitude
        error = np.abs(got - want).max(axis=1) / scale  # (n,)
        report.worst[name] = float(error.max()) if len(error) else 0.0
        report.bad += [(int(i), int(v), name, float(e)) for (i, v), e in zip(pairs, error) if not e <= tolerance]
    return report
