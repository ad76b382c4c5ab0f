"""The teacher cache, read side: `open_cache` -> `TeacherCache`, and `validate_caches` for the distill stage.

A cache (`data/cache/<teacher>.zarr` or `.h5`, docs/design.md section 3) holds one teacher's raw fp16
logits (N, V, C) and aligned block features (N, V, L) for every (sample, view) of the view plan,
with the identity of everything that made them in its attrs. It is written by
`pipeline.cache.write.cache_teacher` (`python -m stages.cache_teachers`); its layout lives in
`pipeline.cache.store`.

Training reads one view slab per epoch, never per-minibatch fancy indexing:

    cache = open_cache("data/cache/resnet18.zarr")
    slab = cache.view_slab(epoch % cache.num_views)   # {"logits": (N, C) fp16, "block1": (N, L) fp16, ...}

For notebooks, `from pipeline.cache import soft_labels` gives a pandas DataFrame (pipeline.cache.frame).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from pipeline import paths
from pipeline.align import AlignConfig
from pipeline.cache.store import (DEFAULT_FORMAT, FORMATS, ChunkError, format_of, layout_from_attrs, open_store,
                                  read_rows, read_view)
from pipeline.cache.topk import LEFTOVER, dense_logits
from pipeline.config import UserError, build, check, check_choice

CACHE_FORMAT = 2  # bump when the layout or the meaning of an attr changes (2: checksummed chunks)


@dataclass
class CacheConfig:
    format: str = DEFAULT_FORMAT  # a registered store format, zarr | h5 (stages.cache_teachers --format overrides)
    align: dict[str, Any] = field(default_factory=lambda: {"kind": "channel", "length": 32})  # pipeline.align
    batch_size: int = 512  # (sample, view) pairs per teacher forward
    # Sample rows per chunk (at most; balanced so the last chunk is not mostly padding: 60000 rows
    # -> 8 chunks of 7500): the write and resume unit, and the read granularity of a view slab. Larger
    # chunks read faster, smaller ones lose less work to a kill; `python -m bench.cache_io --sweep`
    # measures both (bench/results/cpu-cache_io.json). The 1-8 MB per chunk usual elsewhere would be
    # one chunk for the whole of Fashion-MNIST at C=10, i.e. no resume.
    chunk_rows: int = 8192
    # One of the format's codecs: none | zstd | blosc (zarr); none | lzf | gzip (h5). fp16 teacher outputs
    # barely compress (their mantissas are noise) and every codec slows the slab reads (same sweep), so raw
    # storage is the default.
    codec: str = "none"
    checksum: bool = True  # crc32c (zarr) / Fletcher32 (h5) on every chunk, verified on every read
    queue_chunks: int = 2  # finished chunks waiting for the writer thread (bounds memory)
    prefetch_batches: int = 4  # augmented input batches prepared ahead of the teacher forward
    autocast: bool = False  # bf16 autocast on CUDA: faster, but logits carry bf16 (8-bit) precision
    logits: str = "full"  # full: every class's logit | topk: the `topk` largest, their classes and the log-sum-exp
    # of all C (about 4k + 2 bytes per (sample, view) instead of 2C; pipeline.cache.topk)
    topk: int = 5  # k, the logits kept per (sample, view) under logits: topk
    leftover: str = "spread"  # how a top-k store's targets treat the mass outside the k classes when read: spread
    # (FKD's marginal smoothing: evenly over the other C - k classes) | renormalize (the k classes only)

    def __post_init__(self) -> None:
        check_choice(self.format, FORMATS, "cache.format")
        build(AlignConfig, self.align, "cache.align")
        check(self.batch_size >= 1, f"cache.batch_size = {self.batch_size} must be at least 1")
        check(self.chunk_rows >= 1, f"cache.chunk_rows = {self.chunk_rows} must be at least 1")
        check_choice(self.logits, ("full", "topk"), "cache.logits")
        check(1 <= self.topk < 65_535, f"cache.topk = {self.topk} must be in [1, 65535)")
        check_choice(self.leftover, LEFTOVER, "cache.leftover")
        codecs = FORMATS[self.format].codecs
        check(self.codec in codecs, f"cache.codec = {self.codec!r} is not available for format {self.format}: "
                                    f"choose one of {', '.join(codecs)}")
        check(self.queue_chunks >= 1, f"cache.queue_chunks = {self.queue_chunks} must be at least 1")
        check(self.prefetch_batches >= 1, f"cache.prefetch_batches = {self.prefetch_batches} must be at least 1")

    @property
    def align_config(self) -> AlignConfig:
        return build(AlignConfig, self.align, "cache.align")


def rerun_hint(teacher: str, fmt: str, overwrite: bool = False, repair: bool = False, path=None) -> str:
    """The command that (re)builds a teacher's cache in format `fmt` (`repair`: only its damaged chunks); `path`:
    the store's, so that an unmixed store (paths.unmixed_teacher_cache) is named with --unmixed."""
    return (f"python -m stages.cache_teachers --teacher {teacher}"
            + (f" --format {fmt}" if fmt != DEFAULT_FORMAT else "") + (" --unmixed" if paths.is_unmixed_cache(path) else "")
            + (" --overwrite" if overwrite else "") + (" --repair" if repair else ""))


class TeacherCache:
    """One teacher's cache, open for reading (zarr or h5 alike)."""

    def __init__(self, path: str | Path, leftover: str = "spread"):
        self.path = Path(path)
        self.leftover = leftover  # a top-k store's leftover mass, when its logits are read (pipeline.cache.topk)
        self.format = format_of(self.path)
        guess = self.path.name.split(".")[0]
        if not self.path.exists():
            raise UserError(f"teacher cache {self.path} not found: run {rerun_hint(guess, self.format, path=self.path)}")
        try:
            self._store = open_store(self.path)
            self.attrs: dict[str, Any] = self._store.attrs
            self._done = self._store.done()
        except Exception as exc:  # a foreign or damaged store: one line, no traceback
            raise UserError(f"teacher cache {self.path} cannot be read ({type(exc).__name__}): "
                            f"delete it and run {rerun_hint(guess, self.format, path=self.path)}") from None
        if self.attrs.get("format_version") != CACHE_FORMAT:
            self.close()
            raise UserError(f"teacher cache {self.path} has format version {self.attrs.get('format_version')!r}, "
                            f"this code reads {CACHE_FORMAT}: run {rerun_hint(guess, self.format, True, path=self.path)}")
        self.layout = layout_from_attrs(self.attrs)

    # ------------------------------------------------------------ identity and shape

    @property
    def teacher(self) -> str:
        return self.attrs["teacher"]

    @property
    def num_samples(self) -> int:
        return int(self.attrs["num_samples"])

    @property
    def num_views(self) -> int:
        return int(self.attrs["num_views"])

    @property
    def num_classes(self) -> int:
        return int(self.attrs["num_classes"])

    @property
    def blocks(self) -> list[str]:
        return list(self.attrs["blocks"])

    @property
    def dims(self) -> dict[str, int]:
        """Block name -> aligned vector length L."""
        return dict(self.attrs["dims"])

    @property
    def align(self) -> dict[str, Any]:
        return dict(self.attrs["align"])

    @property
    def done_chunks(self) -> int:
        return int(self._done.sum())

    @property
    def done(self) -> np.ndarray:
        """(n_chunks,) uint8: 1 where chunk k's rows are written."""
        return self._done

    @property
    def num_chunks(self) -> int:
        return len(self._done)

    @property
    def complete(self) -> bool:
        """Marked complete and every chunk's `done` marker set."""
        return bool(self.attrs.get("complete")) and bool(self._done.all())

    def check_complete(self) -> None:
        if not self.complete:
            raise UserError(f"cache {self.path} is incomplete ({self.done_chunks}/{self.num_chunks} chunks): "
                            f"rerun {rerun_hint(self.teacher, self.format, path=self.path)} to finish it")

    def check_identity(self, name: str, checkpoint: Path | None = None) -> None:
        """The cache must hold teacher `name`'s outputs, made from the checkpoint at `checkpoint` (when that
        file exists: a cache stands alone once its teacher is gone). A store copied under another
        teacher's name, or made before its teacher was retrained, is a one-line UserError."""
        from pipeline.checkpoints import sha256_file

        fix = f"rerun {rerun_hint(name, self.format, overwrite=True, path=self.path)}"
        if self.teacher != name:
            raise UserError(f"cache {self.path} holds teacher {self.teacher!r}'s outputs, not {name!r}'s: {fix}")
        if checkpoint is not None and Path(checkpoint).is_file() \
                and sha256_file(checkpoint) != self.attrs.get("checkpoint_sha256"):
            raise UserError(f"teacher checkpoint {checkpoint} changed since cache {self.path} was made: {fix}")

    # ------------------------------------------------------------ reading

    def view_slab(self, view: int, names: Iterable[str] | None = None,
                  rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """View `view` of every sample: {"logits": (N, C), "<block>": (N, L), ...}, float16 in RAM.

        `names` limits the read to some of them (e.g. ["logits"]); `rows` (sorted sample indexes) to some samples.
        A top-k store's logits come back dense, its leftover mass treated as `self.leftover` says
        (pipeline.cache.topk).
        """
        if not 0 <= view < self.num_views:
            raise IndexError(f"view {view} out of range: {self.path} has {self.num_views} views")
        wanted = ["logits", *self.blocks] if names is None else list(names)
        out = {}
        for name in wanted:
            if name != "logits" and name not in self.blocks:
                raise KeyError(f"{self.path} has no array {name!r}; it has logits, {', '.join(self.blocks)}")
            with self._verified():
                if name == "logits" and self.layout.topk:  # a top-k store: the dense logits its targets mean
                    parts = [read_view(self._store, self.layout, f"topk/{a}", view, rows)
                             for a in ("logits", "classes", "lse")]
                    out[name] = dense_logits(*parts, self.num_classes, self.leftover).astype(np.float16)
                    continue
                array = "logits" if name == "logits" else f"features/{name}"
                out[name] = read_view(self._store, self.layout, array, view, rows)
        return out

    def pair_rows(self, name: str, pairs: np.ndarray) -> np.ndarray:
        """The rows (n, W) of stored array `name` (a key of `layout.widths()`, as written: a top-k store's arrays
        as kept) for the (sample, view) `pairs` (n, 2); one verified read per (chunk, view) touched, as a read
        costs a whole chunk."""
        out = np.empty((len(pairs), self.layout.widths()[name]), dtype=self.layout.dtype(name))
        chunk = pairs[:, 0] // self.layout.chunk_rows  # (n,)
        with self._verified():
            for k, v in np.unique(np.stack([chunk, pairs[:, 1]], axis=1), axis=0):
                at = np.flatnonzero((chunk == k) & (pairs[:, 1] == v))
                rows = read_rows(self._store, self.layout, name, int(k), int(v))  # (r, W)
                out[at] = rows[pairs[at, 0] - self.layout.rows(int(k))[0]]
        return out

    @contextlib.contextmanager
    def _verified(self):
        """Checksummed chunks: a damaged one ends in one line naming it, with how to rebuild it."""
        try:
            yield
        except ChunkError as err:
            raise UserError(f"cache {self.path}: {err}: run {rerun_hint(self.teacher, self.format, repair=True, path=self.path)} "
                            f"to rebuild the damaged chunks") from None

    def array(self, name: str):
        """The lazy on-disk array (zarr.Array or h5py.Dataset) `logits` or a block name, (N, V, W); or any array
        by its stored name (`topk/logits`, `features/block1`: the keys of `layout.widths()`)."""
        if name in self.layout.widths():
            return self._store.array(name)
        return self._store.array("logits" if name == "logits" else f"features/{name}")

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> "TeacherCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"{self.done_chunks}/{self.num_chunks} chunks"
        return (f"TeacherCache({str(self.path)!r}, teacher={self.teacher!r}, N={self.num_samples}, "
                f"V={self.num_views}, C={self.num_classes}, blocks={self.dims}, {state})")


def open_cache(path: str | Path, leftover: str = "spread") -> TeacherCache:
    """The store at `path`, open for reading; `leftover`: how a top-k store's logits are read (cache.leftover)."""
    return TeacherCache(path, leftover)


def validate_caches(
    caches: Iterable[TeacherCache | str | Path],
    plan,
    data_fingerprint: str,
    num_classes: int,
    check_checkpoints: bool = True,
    checkpoint_path: Callable[[str], Path] = paths.teacher_checkpoint,
    teachers: list[str] | None = None,
) -> list[TeacherCache]:
    """Refuse, with one line naming the cache and the fix, caches the student cannot use together.

    Checks each cache against the teacher it is used as (`teachers`, in the caches' order: its name,
    and with `check_checkpoints` that teacher's checkpoint, `check_identity`), the view plan (`plan`, a
    ViewPlan), the student's training data (`data_fingerprint`, `num_classes`) and the others (N, V,
    number of blocks, align spec), and that it is complete. Returns the caches, opened.
    """
    opened = [c if isinstance(c, TeacherCache) else open_cache(c) for c in caches]
    names = list(teachers) if teachers is not None else [c.teacher for c in opened]
    if len(names) != len(opened):
        raise ValueError(f"{len(opened)} caches for {len(names)} teacher names")
    if not opened:
        raise UserError("no teacher caches given: list the teachers to distill from and cache them first")
    plan_name = plan.path or "the view plan"
    if plan.dataset_fingerprint != data_fingerprint:
        raise UserError(f"view plan {plan_name} was made from another dataset than the student's training data: "
                        f"rerun python -m stages.plan_views, then the teacher caches")
    first = opened[0]
    for cache, name in zip(opened, names):
        cache.check_identity(name, checkpoint_path(name) if check_checkpoints else None)
        fix = f"rerun {rerun_hint(cache.teacher, cache.format, overwrite=True, path=cache.path)}"
        if cache.attrs.get("view_plan_fingerprint") != plan.fingerprint:
            raise UserError(f"cache {cache.path} was made from another view plan than {plan_name}: {fix}")
        if cache.attrs.get("dataset_fingerprint") != data_fingerprint:
            raise UserError(f"cache {cache.path} was made from another dataset than the student's training data: {fix}")
        if cache.num_classes != num_classes:
            raise UserError(f"cache {cache.path} has {cache.num_classes} classes but the data has {num_classes}: {fix}")
        for what, mine, theirs in (
            ("sample count", cache.num_samples, first.num_samples),
            ("view count", cache.num_views, first.num_views),
            ("block count", len(cache.blocks), len(first.blocks)),
            ("align spec", cache.align, first.align),
        ):
            if mine != theirs:
                raise UserError(f"caches {first.path} and {cache.path} disagree on the {what} ({theirs} vs {mine}): "
                                f"rebuild them with the same params ({fix})")
        cache.check_complete()
    return opened
