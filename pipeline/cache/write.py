"""Filling a teacher cache: every (sample, view) of the view plan through the frozen teacher, resumable.

    cache_teacher(checkpoint, out, plan, data, cfg, device)

The work is cut into chunks of `cfg.chunk_rows` samples x all views (pipeline.cache.store). Three
stages overlap, joined by bounded queues, so the teacher forward never waits on the disk:

    prefetch thread   view replay (apply_views + normalize) of the next input batches
    main thread       teacher forward (eval, no grad) + alignment pooling -> fp16 chunk buffers
    writer thread     chunk k's rows into the store, then its `done` marker

A run killed anywhere and rerun skips the chunks marked done and ends with the same bytes as an
uninterrupted run: a chunk's content depends only on its index (its rows, the plan and the forward
batches inside it), never on which chunks ran before. The store is marked `complete` only after every
marker is set. A store made from another checkpoint, view plan, dataset or align spec is never
touched without --overwrite, and with it the new store is built beside the old one and swapped in
only once complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

import pipeline
from pipeline.align import align_all
from pipeline.augment import apply_views, normalize
from pipeline.cache.read import CACHE_FORMAT, CacheConfig, rerun_hint
from pipeline.cache.store import (Layout, create_store, damaged_chunks, format_of, open_store, remove_path, swap_in,
                                  writer_lock)
from pipeline.checkpoints import changed_settings, check_fits_data, load_teacher, sha256_file
from pipeline.config import UserError, to_dict
from pipeline.device import memory_format
from pipeline.dist import World, barrier, broadcast
from pipeline.views import ViewPlan

# attrs that say what a cache's numbers are; a store differing in any of them is another cache
IDENTITY = {
    "format_version": "format version",
    "teacher": "teacher name",
    "arch": "architecture",
    "model_kwargs": "model arguments",
    "checkpoint_sha256": "checkpoint",
    "view_plan_fingerprint": "view plan",
    "dataset_fingerprint": "dataset",
    "num_classes": "class count",
    "num_samples": "sample count",
    "num_views": "view count",
    "blocks": "blocks",
    "align": "align spec",
    "dtype": "dtype",
}


def cache_teacher(
    checkpoint: str | Path,
    out: str | Path,
    plan: ViewPlan,
    data,
    cfg: CacheConfig,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
    teacher: str | None = None,
    repair: bool = False,
    world: World = World(),
) -> dict[str, Any]:
    """Fill the cache `out` (.zarr or .h5) for the teacher at `checkpoint`; returns a summary dict.

    `teacher` is the name the cache records (default: the checkpoint's file stem, which is how
    `paths.teacher_checkpoint(name)` finds it again when validate_caches checks its hash).
    `data` is the ImageData of the split the plan was made from. `on_chunk(k)` is called by the writer
    after chunk k is marked done (progress reporting, and the tests' fault injection); `log(line)` gets
    one line once every check passed and the work starts. `repair`: verify every chunk of an existing
    store first and rebuild those whose checksum (or content) fails, keeping the rest.
    One writer per store: a second `cache_teacher` on the same `out` ends at once (`writer_lock`).
    Under torchrun (`world`) the job is that writer: rank 0 holds the lock and prepares the store, rank r
    writes pending chunks r, r + W, ..., rank 0 marks the store complete after a barrier (zarr only).
    """
    checkpoint, out, device = Path(checkpoint), Path(out), torch.device(device)
    if not checkpoint.is_file():
        raise UserError(f"teacher checkpoint {checkpoint} not found: run python -m stages.pretrain "
                        f"--teacher {checkpoint.stem} first")
    model, ckpt = load_teacher(checkpoint, device)
    teacher = teacher or checkpoint.stem
    _check_inputs(teacher, ckpt, plan, data, checkpoint)

    align_cfg = cfg.align_config
    with torch.no_grad():
        _, feats = model(torch.zeros(2, *data.images.shape[1:], device=device))  # block names and widths
    blocks = [f"block{i + 1}" for i in range(len(feats))]
    lengths = align_cfg.lengths(len(blocks))
    attrs = _json({
        "format_version": CACHE_FORMAT,
        "teacher": teacher,
        "arch": ckpt["arch"],
        "model_kwargs": ckpt["model_kwargs"],
        "checkpoint_sha256": sha256_file(checkpoint),
        "view_plan_fingerprint": plan.fingerprint,
        "dataset_fingerprint": plan.dataset_fingerprint,
        "dataset": plan.attrs["dataset"],
        "split": plan.attrs["split"],
        "num_classes": int(ckpt["model_kwargs"]["num_classes"]),
        "num_samples": plan.num_samples,
        "num_views": plan.num_views,
        "blocks": blocks,
        "dims": dict(zip(blocks, lengths)),
        "block_channels": {b: int(f.shape[1]) for b, f in zip(blocks, feats)},
        "align": to_dict(align_cfg),
        "dtype": "float16",
        "compute": "bf16-autocast" if cfg.autocast and device.type == "cuda" else "fp32",
        "software_version": pipeline.__version__,
        "complete": False,
    })
    n_chunks = max(1, -(-plan.num_samples // cfg.chunk_rows))
    rows = max(1, -(-plan.num_samples // n_chunks))  # <= chunk_rows, balanced: no mostly-empty last chunk
    layout = Layout(plan.num_samples, plan.num_views, attrs["num_classes"], tuple(blocks), tuple(lengths),
                    rows, cfg.codec, cfg.checksum)
    attrs.update(layout.to_attrs())

    if world.distributed and format_of(out) == "h5":
        raise UserError(f"cache {out}: an HDF5 store cannot be written by {world.size} processes (h5py has no safe "
                        f"parallel writer without MPI, and gathering every chunk to one rank would make that rank the "
                        f"bottleneck): write --format zarr, or run python -m stages.cache_teachers with one process")
    echo = log if world.main else None
    with contextlib.ExitStack() as held:
        # rank 0 alone holds the lock and prepares the store; its failure reaches the others, which would
        # otherwise wait for it in a collective
        prepared: tuple | str
        try:
            if world.main:
                held.enter_context(writer_lock(out))  # taken before the store is created, resumed, repaired or swapped
                store, staging = _prepare_store(out, attrs, layout, overwrite, repair)
                held.callback(store.close)
                layout = dataclasses.replace(layout, **_layout_of(store.attrs))  # a resumed store keeps its layout
                damaged = _clear_damaged(store, layout) if repair else []
                done = store.done()
                prepared = (str(store.path), _layout_of(store.attrs),
                            [k for k in range(layout.n_chunks) if not done[k]], damaged)
        except UserError as err:
            broadcast(err.message, world)
            raise
        prepared = broadcast(prepared if world.main else None, world)
        if isinstance(prepared, str):
            raise UserError(prepared)
        target, stored_layout, pending, damaged = prepared
        if not world.main:
            layout = dataclasses.replace(layout, **stored_layout)
            store = _open_writable(Path(target))
            held.callback(store.close)
        if echo is not None:
            chunks = f"{layout.n_chunks} chunk{'s' if layout.n_chunks != 1 else ''}"
            state = (f"resuming, {len(pending)} of {chunks} to go" if 0 < len(pending) < layout.n_chunks
                     else "already complete" if not pending else chunks)
            if repair:
                state += f", {len(damaged)} damaged chunk(s) to rebuild" if damaged else ", every chunk verified"
            ranks = f" x {world.size} processes" if world.distributed else ""
            echo(f"cache {teacher} ({attrs['arch']}) -> {store.path}: {layout.num_samples} samples x "
                 f"{layout.num_views} views on {device}{ranks}, {state}")
        mine = pending[world.rank::world.size]  # rank r owns whole chunks: no zarr chunk has two writers
        if mine:
            _run_chunks(model, store, layout, mine, plan, data, cfg, device, progress and world.main, on_chunk,
                        teacher, elsewhere=set(pending) - set(mine))
        barrier(world)  # every rank's chunks are marked done
        if world.main:
            if not store.done().all():  # cannot happen unless the store was changed under us
                raise UserError(f"cache {out} still has unwritten chunks: rerun {rerun_hint(teacher, store.format)}")
            if not store.attrs.get("complete"):
                store.update_attrs({"complete": True})
            store.close()
            if staging is not None:
                swap_in(staging, out)
        barrier(world)  # the store is complete (and in place) when any rank returns
    return {"teacher": teacher, "path": str(out), "chunks_written": len(pending), "chunks": layout.n_chunks,
            "num_samples": layout.num_samples, "num_views": layout.num_views, "repaired": damaged}


def _clear_damaged(store, layout: Layout) -> list[int]:
    """Clear the `done` marker of every chunk that fails verification (and `complete`), so the pass
    rebuilds exactly those; returns them."""
    bad = sorted(damaged_chunks(store, layout))
    for k in bad:
        store.mark_done(k, 0)
    if bad:
        store.update_attrs({"complete": False})
    return bad


def verify_cache(out: str | Path) -> dict[int, list[str]]:
    """Every damaged chunk of the store at `out` -> the arrays at fault ({} when every chunk verifies)."""
    from pipeline.cache.store import layout_from_attrs

    out = Path(out)
    store = _try_open(out)
    if store is None:
        raise UserError(f"{out} cannot be read as a teacher cache ({_open_error(out) if out.exists() else 'not found'})")
    try:
        return damaged_chunks(store, layout_from_attrs(store.attrs))
    finally:
        store.close()


# ---------------------------------------------------------------- checks and store preparation


def _check_inputs(teacher: str, ckpt: dict, plan: ViewPlan, data, checkpoint: Path) -> None:
    if data.fingerprint != plan.dataset_fingerprint:
        raise UserError(f"view plan {plan.path or ''} was made from another dataset than the current training split "
                        f"({data.name}): rerun python -m stages.plan_views")
    check_fits_data("teacher checkpoint", checkpoint, ckpt.get("dataset_fingerprint"), ckpt["model_kwargs"], data,
                    f"retrain it with python -m stages.pretrain --teacher {teacher} --restart")


def _prepare_store(out: Path, attrs: dict[str, Any], layout: Layout, overwrite: bool, repair: bool = False):
    """The store to write into, and the staging path to swap in at the end (or None).

    An existing store with the same identity is resumed; one with another identity is an error unless
    `overwrite`, in which case a new store is built at `<out>.new` and the old one stays untouched
    until the new one is complete.
    """
    recover_swap(out)
    staging = out.with_name(out.name + ".new")
    target = out
    if out.exists():
        existing = _try_open(out)
        if existing is None and not overwrite:
            raise UserError(f"{out} exists but cannot be read as a teacher cache ({_open_error(out)}): "
                            f"pass --overwrite to replace it, or delete it")
        if existing is not None:
            changed = identity_diff(existing.attrs, attrs)
            if not (overwrite or repair or changed) and existing.attrs.get("complete") and existing.done().all():
                return existing, None  # up to date: nothing to write, stay read-only
            existing.close()
            if not overwrite:
                if changed:
                    raise UserError(changed_settings("cache", out, changed, "--overwrite", "replace it"))
                return _open_writable(out), None
        target = staging
        if staging.exists():  # a previous --overwrite run that did not finish
            previous = _try_open(staging)
            if previous is not None:
                changed = identity_diff(previous.attrs, attrs)
                previous.close()
                if not changed:
                    return _open_writable(staging), staging
            remove_path(staging)  # partial work for an identity nobody asks for any more
    creating = target.with_name(target.name + ".creating")
    try:
        remove_path(creating)
        target.parent.mkdir(parents=True, exist_ok=True)
        create_store(creating, layout, attrs).close()
        creating.rename(target)  # the store appears whole, attrs included, or not at all
    except OSError as exc:
        try:
            remove_path(creating)
        except OSError:
            pass
        raise UserError(f"cannot write the cache at {out} ({exc.strerror or exc}): "
                        f"choose a writable location or fix the permissions of {out.parent}") from None
    return _open_writable(target), (staging if target == staging else None)


def recover_swap(out: Path) -> None:
    """Finish a swap (`cache_store.swap_in`) that a killed run left half done."""
    old = out.with_name(out.name + ".old")
    staging = out.with_name(out.name + ".new")
    if not out.exists():
        new = _try_open(staging) if staging.exists() else None
        if new is not None and new.attrs.get("complete") and new.done().all():
            new.close()
            staging.rename(out)
        elif old.exists():
            if new is not None:
                new.close()
            old.rename(out)
        elif new is not None:
            new.close()
    if out.exists() and old.exists():
        remove_path(old)


def identity_diff(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Names of the identity attrs that differ between a stored cache and the one asked for."""
    return [label for key, label in IDENTITY.items() if stored.get(key) != wanted.get(key)]


def _try_open(path: Path):
    try:
        store = open_store(path)
    except Exception:
        return None
    if "format_version" not in store.attrs:
        store.close()
        return None
    return store


def _open_error(path: Path) -> str:
    """Why `path` does not open as a cache, in a few words (for the refusal message)."""
    try:
        open_store(path).close()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return "no cache attributes"


def _open_writable(path: Path):
    try:
        return open_store(path, writable=True)
    except OSError as exc:
        raise UserError(f"cannot open the cache {path} for writing ({exc.strerror or exc}): "
                        f"close whatever has it open and check its permissions") from None


def _layout_of(attrs: dict[str, Any]) -> dict[str, Any]:
    return {"chunk_rows": attrs["chunk_rows"], "codec": attrs["codec"], "checksum": bool(attrs.get("checksum", False))}


def _json(value: Any) -> Any:
    """What the value reads back as from zarr/h5 attrs (tuples become lists...), for comparisons."""
    return json.loads(json.dumps(value))


# ---------------------------------------------------------------- the pipelined pass


def _run_chunks(model, store, layout: Layout, pending: list[int], plan: ViewPlan, data, cfg: CacheConfig,
                device: torch.device, progress: bool, on_chunk, teacher: str,
                elsewhere: set[int] = frozenset()) -> None:
    """Write the `pending` chunks; `elsewhere`: those other ranks write (left out of the progress bar)."""
    align_cfg = cfg.align_config
    names = list(layout.widths())  # logits, features/block1, ...
    widths = layout.widths()
    v_count = layout.num_views
    fmt = memory_format(device)
    model.to(memory_format=fmt)
    images = data.images.to(device)  # (N, C, H, W) uint8, resident for the pass
    aug = torch.from_numpy(plan.aug).to(device)  # (N, V, P) int16
    aug_cfg = plan.augment
    use_autocast = cfg.autocast and device.type == "cuda"

    def batches() -> Iterator[tuple[int, int, torch.Tensor]]:
        """(chunk, first flat index, normalized views) in chunk order; runs on the prefetch thread."""
        for k in pending:
            start, stop = layout.rows(k)
            n = (stop - start) * v_count  # (sample, view) pairs of the chunk, sample-major
            for s in range(0, n, cfg.batch_size):
                flat = torch.arange(s, min(n, s + cfg.batch_size), device=device)  # (b,)
                rows, views = start + flat // v_count, flat % v_count
                x = apply_views(images[rows], aug[rows, views], aug_cfg)  # (b, C, H, W) uint8
                yield k, s, normalize(x, data.mean, data.std).contiguous(memory_format=fmt)

    views_of = lambda chunks: sum((b - a) * v_count for a, b in map(layout.rows, chunks))  # noqa: E731
    total = views_of(set(range(layout.n_chunks)) - set(elsewhere))
    finished = views_of(set(range(layout.n_chunks)) - set(pending) - set(elsewhere))
    desc = f"cache {teacher}" + (" (rank 0)" if elsewhere else "")
    bar = tqdm(total=total, initial=finished, unit="view", desc=desc, disable=not progress,
               smoothing=0.05)
    writer = _Writer(store, cfg.queue_chunks, on_chunk)
    inputs = background(batches(), cfg.prefetch_batches)
    buffers: dict[str, np.ndarray] = {}
    try:
        for k, s, x in inputs:
            if writer.error is not None:
                break  # the store cannot take more: stop computing
            start, stop = layout.rows(k)
            n = (stop - start) * v_count
            if s == 0:
                buffers = {name: np.empty((n, widths[name]), dtype=np.float16) for name in names}  # (n, W)
            with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=use_autocast):
                logits, feats = model(x)  # (b, C), [(b, C_i, H_i, W_i) or (b, D_i)]
                outputs = [logits.float(), *align_all(feats, align_cfg)]  # (b, C), (b, L_i) per block
            for name, value in zip(names, outputs):
                buffers[name][s:s + len(x)] = value.to(torch.float16).cpu().numpy()
            bar.update(len(x))
            if s + len(x) == n:  # chunk k complete: hand it to the writer, start the next
                chunk = {name: buf.reshape(stop - start, v_count, -1) for name, buf in buffers.items()}
                bad = [name for name, value in chunk.items() if not np.isfinite(value).all()]
                if bad:
                    raise UserError(f"teacher {teacher} produced non-finite values in {', '.join(bad)} "
                                    f"(samples {start}-{stop - 1}; fp16 overflow?): check the checkpoint")
                writer.submit((k, start, chunk))
    finally:
        inputs.close()
        writer.finish()  # chunks already computed are still written: finished work is kept
        bar.close()
    writer.raise_error(store.path, teacher)


class _Writer(threading.Thread):
    """Writes finished chunks (rows, then the `done` marker) while the next chunk is computed."""

    def __init__(self, store, depth: int, on_chunk: Callable[[int], None] | None):
        super().__init__(name="cache-writer", daemon=True)
        self.store, self.on_chunk = store, on_chunk
        self.queue: queue.Queue = queue.Queue(depth)
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain without writing after a failure
            k, start, arrays = item
            try:
                self.store.write_rows(start, arrays)
                self.store.mark_done(k)
                if self.on_chunk is not None:
                    self.on_chunk(k)
            except BaseException as exc:  # re-raised on the main thread
                self.error = exc

    def submit(self, item) -> None:
        while True:
            if self.error is not None:
                return  # the main loop stops at its next batch; raise_error reports the failure
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        self.queue.put(None)
        self.join()

    def raise_error(self, path: Path, teacher: str) -> None:
        if isinstance(self.error, OSError):
            raise UserError(f"writing cache {path} failed ({self.error.strerror or self.error}): fix the disk "
                            f"(space, permissions) and rerun {rerun_hint(teacher, self.store.format)} "
                            f"to resume") from None
        if self.error is not None:
            raise self.error


def background(iterable: Iterable, depth: int) -> Iterator:
    """Iterate `iterable` on a daemon thread, `depth` items ahead; its exceptions surface here."""
    items: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in iterable:
                if not put(item):
                    return
            put(end)
        except BaseException as exc:
            put(_Raised(exc))

    thread = threading.Thread(target=run, name="cache-prefetch", daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not end:
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc
