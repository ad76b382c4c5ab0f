"""Filling a teacher cache: every (sample, view) of the view plan through the frozen teacher, resumable.

    cache_teacher(checkpoint, out, plan, data, cfg, device)

The work is cut into chunks of `cfg.chunk_rows` samples x all views (pipeline.cache.store). Three
stages overlap, joined by bounded queues, so the teacher forward never waits on the disk:

    prefetch thread   view replay (tensor_views: apply_views, mixing + normalize) of the next input batches
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

import pipeline
from pipeline.align import align_all
from pipeline.augment import normalize
from pipeline.mix import tensor_views
from pipeline.data.files import FileData, file_views
from pipeline.cache.plan import check_room, store_plan
from pipeline.cache.read import CACHE_FORMAT, CacheConfig, open_cache, rerun_hint
from pipeline.cache.store import (FORMATS, Layout, create_store, damaged_chunks, format_of, layout_from_attrs, open_store,
                                  writer_lock)
from pipeline.checkpoints import changed_settings, check_fits_data, disk_errors, remove_path, sha256_file, swap_in
from pipeline.models import load_teacher
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
    "topk": "logits kept (top-k)",  # absent (full logits) in stores from before top-k, and in full-logit stores
}


@dataclass(frozen=True)
class CacheJob:
    """How one `cache_teacher` call runs, beside what it caches: its keyword options."""

    overwrite: bool = False  # replace a store of another identity (built beside it, swapped in once complete)
    repair: bool = False  # verify every chunk of the existing store first, rebuild those that fail, keep the rest
    progress: bool = True  # a progress bar (rank 0's)
    on_chunk: Callable[[int], None] | None = None  # called by the writer once chunk k is marked done
    log: Callable[[str], None] | None = None  # gets one line once every check passed and the work starts
    teacher: str | None = None  # the name the cache records (default: the checkpoint's file stem)
    world: World = World()  # this process's place in a torchrun job (World(): one process)


@dataclass
class Prepared:
    """Rank 0's preparation of the store, broadcast to every rank: where to write, in which layout, what is left."""

    path: str = ""  # the store every rank writes into (`out`, or `<out>.new` under --overwrite)
    layout: dict[str, Any] = field(default_factory=dict)  # its chunk_rows, codec, checksum (a resumed store's own)
    pending: list[int] = field(default_factory=list)  # its chunks not marked done
    damaged: list[int] = field(default_factory=list)  # the chunks --repair found damaged (pending again)
    error: str | None = None  # rank 0's one-line failure, which every rank raises


def cache_teacher(checkpoint: str | Path, out: str | Path, plan: ViewPlan, data, cfg: CacheConfig,
                  device: torch.device | str = "cpu", **options) -> dict[str, Any]:
    """Fill the cache `out` (any registered format, by its suffix) for the teacher at `checkpoint`; returns a
    summary dict. `data` is the ImageData of the split the plan was made from; `options` are CacheJob's fields.

    `teacher` is the name the cache records (default: the checkpoint's file stem, which is how
    `paths.teacher_checkpoint(name)` finds it again when validate_caches checks its hash). `on_chunk(k)`
    serves progress reporting and the tests' fault injection.
    One writer per store: a second `cache_teacher` on the same `out` ends at once (`writer_lock`).
    Under torchrun (`world`) the job is that writer: rank 0 holds the lock and prepares the store, rank r
    writes pending chunks r, r + W, ..., rank 0 marks the store complete after a barrier (only in a format
    with `parallel_writers`).
    """
    checkpoint, out, device = Path(checkpoint), Path(out), torch.device(device)
    job = dataclasses.replace(CacheJob(**options), teacher=options.get("teacher") or checkpoint.stem)
    model, ckpt = load_checked_teacher(checkpoint, job.teacher, plan, data, device)
    attrs = identity_attrs(job.teacher, checkpoint, ckpt, plan, cfg, block_channels(model, data, device), device)
    layout = chunk_layout(attrs, cfg)
    attrs.update(layout.to_attrs())
    world = job.world
    _check_writers(out, world)
    with contextlib.ExitStack() as held:
        store, staging, prepared = _prepare(out, attrs, layout, job, held)
        layout = dataclasses.replace(layout, **prepared.layout)
        if job.log is not None and world.main:
            job.log(_start_line(attrs, layout, prepared, job, device))
        mine = prepared.pending[world.rank::world.size]  # rank r owns whole chunks: no chunk has two writers
        if mine:
            _run_chunks(model, store, layout, mine, plan, data, cfg, device, job,
                        elsewhere=set(prepared.pending) - set(mine))
        barrier(world)  # every rank's chunks are marked done
        if world.main:
            _finish(store, out, staging, job.teacher)
        barrier(world)  # the store is complete (and in place) when any rank returns
    return {"teacher": job.teacher, "path": str(out), "chunks_written": len(prepared.pending),
            "chunks": layout.n_chunks, "num_samples": layout.num_samples, "num_views": layout.num_views,
            "repaired": prepared.damaged}


def identity_attrs(teacher: str, checkpoint: Path, ckpt: dict, plan: ViewPlan, cfg: CacheConfig,
                   channels: dict[str, int], device: torch.device) -> dict[str, Any]:
    """A new store's attrs but its layout: what says what its numbers are (IDENTITY) and how they were made.
    `channels`: the teacher's blocks in order -> their channel counts."""
    blocks = list(channels)
    align_cfg = cfg.align_config
    return _json({
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
        "dims": dict(zip(blocks, align_cfg.lengths(len(blocks)))),
        "block_channels": channels,
        "align": to_dict(align_cfg),
        "dtype": "float16",
        "compute": "bf16-autocast" if cfg.autocast and device.type == "cuda" else "fp32",
        "software_version": pipeline.__version__,
        "complete": False,
        **({"topk": cfg.topk} if cfg.logits == "topk" else {}),  # full logits: the attrs of before, unchanged
    })


def chunk_layout(attrs: dict[str, Any], cfg: CacheConfig) -> Layout:
    """The layout of a new store with these identity attrs: chunks of at most `cfg.chunk_rows` rows,
    balanced so that the last chunk is not mostly empty."""
    n = attrs["num_samples"]
    n_chunks = max(1, -(-n // cfg.chunk_rows))
    blocks = tuple(attrs["blocks"])
    return Layout(n, attrs["num_views"], attrs["num_classes"], blocks, tuple(attrs["dims"][b] for b in blocks),
                  max(1, -(-n // n_chunks)), cfg.codec, cfg.checksum, int(attrs.get("topk", 0)))


def block_channels(model, data, device: torch.device) -> dict[str, int]:
    """The teacher's feature blocks (block1, block2...) -> their channel counts, from one forward of blanks."""
    with torch.no_grad():
        _, feats = model(torch.zeros(2, *data.view_shape, device=device))
    return {f"block{i + 1}": int(f.shape[1]) for i, f in enumerate(feats)}


def _start_line(attrs: dict[str, Any], layout: Layout, prepared: Prepared, job: CacheJob, device) -> str:
    """The one line `log` gets when the work starts: what is cached where, and how much is left."""
    pending, n = prepared.pending, layout.n_chunks
    chunks = f"{n} chunk{'s' if n != 1 else ''}"
    state = (f"resuming, {len(pending)} of {chunks} to go" if 0 < len(pending) < n
             else "already complete" if not pending else chunks)
    if job.repair:
        damaged = len(prepared.damaged)
        state += f", {damaged} damaged chunk(s) to rebuild" if damaged else ", every chunk verified"
    ranks = f" x {job.world.size} processes" if job.world.distributed else ""
    return (f"cache {attrs['teacher']} ({attrs['arch']}) -> {prepared.path}: {layout.num_samples} samples x "
            f"{layout.num_views} views on {device}{ranks}, {state}")


def _check_writers(out: Path, world: World) -> None:
    """Several processes write one store only in a format that declares `parallel_writers`."""
    fmt = FORMATS[format_of(out)]
    if world.distributed and not fmt.parallel_writers:
        able = " or ".join(f"--format {name}" for name, other in FORMATS.items() if other.parallel_writers)
        raise UserError(f"cache {out}: {fmt.label} cannot be written by {world.size} processes (format {fmt.name} "
                        f"has no parallel writer): " + (f"write {able}, or " if able else "")
                        + "run python -m stages.cache_teachers with one process")


def _prepare(out: Path, attrs: dict[str, Any], layout: Layout, job: CacheJob, held: contextlib.ExitStack):
    """(store, staging path or None, Prepared) on every rank: rank 0 alone takes the lock and prepares the
    store; the others get its result, a failure too (they would otherwise wait for it in a collective),
    and open the store it names. What must be closed or released at the end goes onto `held`."""
    world = job.world
    store = staging = failure = prepared = None
    if world.main:
        try:
            store, staging, prepared = _prepare_main(out, attrs, layout, job, held)
        except UserError as err:
            failure, prepared = err, Prepared(error=err.message)
    prepared = broadcast(prepared, world)
    if failure is not None:
        raise failure
    if prepared.error is not None:
        raise UserError(prepared.error)
    if not world.main:
        store = _open_writable(Path(prepared.path))
        held.callback(store.close)
    return store, staging, prepared


def _prepare_main(out: Path, attrs: dict[str, Any], layout: Layout, job: CacheJob, held: contextlib.ExitStack):
    """Rank 0: hold the writer lock (taken before the store is created, resumed, repaired or swapped) and
    make the store ready: created, resumed or staged (`_prepare_store`), its damaged chunks cleared (repair)."""
    held.enter_context(writer_lock(out))
    _check_room(out, layout, job)  # before the store is created or resumed: nothing written yet
    store, staging = _prepare_store(out, attrs, layout, job.overwrite, job.repair)
    held.callback(store.close)
    stored = _layout_of(store.attrs)  # a resumed store keeps its layout
    damaged = _clear_damaged(store, dataclasses.replace(layout, **stored), job.teacher) if job.repair else []
    done = store.done()
    return store, staging, Prepared(str(store.path), stored, [k for k in range(len(done)) if not done[k]], damaged)


def _check_room(out: Path, layout: Layout, job: CacheJob) -> None:
    """The chunks still to write must fit where the store goes: all of them for a new or staged (--overwrite)
    store, those not yet done for a resumed one (a store that does not open is refused by _prepare_store)."""
    todo, rows = layout.n_chunks, layout.chunk_rows
    if out.exists() and not job.overwrite:
        try:
            with open_cache(out) as old:
                todo, rows = old.num_chunks - old.done_chunks, old.layout.chunk_rows
        except (UserError, OSError, KeyError, ValueError):
            pass
    pair = store_plan(job.teacher, out, 1, 1, layout.num_classes, dict(zip(layout.blocks, layout.feature_lengths)),
                      layout.topk)
    check_room(out, todo * rows * layout.num_views * pair.pair_bytes, f"the cache of {job.teacher}")


def _finish(store, out: Path, staging: Path | None, teacher: str) -> None:
    """Rank 0, once every chunk is written: mark the store complete and swap it in (--overwrite)."""
    hint = rerun_hint(teacher, store.name, path=out)
    if not store.done().all():  # cannot happen unless the store was changed under us
        raise UserError(f"cache {out} still has unwritten chunks: rerun {hint}")
    with disk_errors(f"cannot finish the cache {out}", f"fix the permissions of {out.parent}", f"rerun {hint}"):
        if not store.attrs.get("complete"):
            store.update_attrs({"complete": True})
        store.close()
        if staging is not None:
            swap_in(staging, out)


def _clear_damaged(store, layout: Layout, teacher: str) -> list[int]:
    """Clear the `done` marker of every chunk that fails verification (and `complete`), so the pass
    rebuilds exactly those; returns them."""
    bad = sorted(damaged_chunks(store, layout))
    with disk_errors(f"cannot repair the cache {store.path}", f"fix the permissions of {store.path}",
                     f"rerun {rerun_hint(teacher, store.name, repair=True, path=store.path)}"):
        for k in bad:
            store.mark_done(k, 0)
        if bad:
            store.update_attrs({"complete": False})
    return bad


def verify_cache(out: str | Path) -> dict[int, list[str]]:
    """Every damaged chunk of the store at `out` -> the arrays at fault ({} when every chunk verifies)."""
    out = Path(out)
    store = _try_open(out)
    if store is None:
        raise UserError(f"{out} cannot be read as a teacher cache ({_open_error(out) if out.exists() else 'not found'})")
    try:
        return damaged_chunks(store, layout_from_attrs(store.attrs))
    finally:
        store.close()


# ---------------------------------------------------------------- checks and store preparation


def load_checked_teacher(checkpoint: Path, teacher: str, plan: ViewPlan, data, device: torch.device):
    """The teacher (model, checkpoint dict), once it is known to fit the plan and the data."""
    if not checkpoint.is_file():
        raise UserError(f"teacher checkpoint {checkpoint} not found: run python -m stages.pretrain "
                        f"--teacher {checkpoint.stem} first")
    model, ckpt = load_teacher(checkpoint, device)
    if data.fingerprint != plan.dataset_fingerprint:
        raise UserError(f"view plan {plan.path or ''} was made from another dataset than the current training split "
                        f"({data.name}): rerun python -m stages.plan_views")
    check_fits_data("teacher checkpoint", checkpoint, ckpt.get("dataset_fingerprint"), ckpt["model_kwargs"], data,
                    f"retrain it with python -m stages.pretrain --teacher {teacher} --restart")
    return model, ckpt


def _prepare_store(out: Path, attrs: dict[str, Any], layout: Layout, overwrite: bool, repair: bool = False):
    """The store to write into, and the staging path to swap in at the end (or None).

    An existing store with the same identity is resumed; one with another identity is an error unless
    `overwrite`, in which case a new store is built at `<out>.new` and the old one stays untouched
    until the new one is complete.
    """
    recover_swap(out)
    staging = out.with_name(out.name + ".new")
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
        if _resumable(staging, attrs):  # a previous --overwrite run that did not finish
            return _open_writable(staging), staging
        remove_path(staging)  # partial work for an identity nobody asks for any more
        _create(out, staging, layout, attrs)
        return _open_writable(staging), staging
    _create(out, out, layout, attrs)
    return _open_writable(out), None


def _resumable(path: Path, attrs: dict[str, Any]) -> bool:
    """Whether `path` holds a store of this identity (to resume)."""
    store = _try_open(path) if path.exists() else None
    if store is None:
        return False
    changed = identity_diff(store.attrs, attrs)
    store.close()
    return not changed


def _create(out: Path, target: Path, layout: Layout, attrs: dict[str, Any]) -> None:
    """A new, empty store at `target` (`out` or its staging path). It appears whole, attrs included, or not
    at all: it is made under a temporary name and renamed."""
    creating = target.with_name(target.name + ".creating")
    with disk_errors(f"cannot write the cache at {out}",
                     f"choose a writable location or fix the permissions of {out.parent}", "rerun"):
        try:
            remove_path(creating)
            target.parent.mkdir(parents=True, exist_ok=True)
            create_store(creating, layout, attrs).close()
            creating.rename(target)
        except OSError:
            with contextlib.suppress(OSError):
                remove_path(creating)
            raise


def recover_swap(out: Path) -> None:
    """Finish a swap (`pipeline.checkpoints.swap_in`) that a killed run left half done."""
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
    with disk_errors(f"cannot open the cache {path} for writing",
                     "close whatever has it open and check its permissions"):
        return open_store(path, writable=True)


def _layout_of(attrs: dict[str, Any]) -> dict[str, Any]:
    return {"chunk_rows": attrs["chunk_rows"], "codec": attrs["codec"], "checksum": bool(attrs.get("checksum", False))}


def _json(value: Any) -> Any:
    """What the value reads back as from zarr/h5 attrs (tuples become lists...), for comparisons."""
    return json.loads(json.dumps(value))


# ---------------------------------------------------------------- the pipelined pass


def _run_chunks(model, store, layout: Layout, pending: list[int], plan: ViewPlan, data, cfg: CacheConfig,
                device: torch.device, job: CacheJob, elsewhere: set[int] = frozenset()) -> None:
    """Write the `pending` chunks; `elsewhere`: those other ranks write (left out of the progress bar)."""
    align_cfg = cfg.align_config
    use_autocast = cfg.autocast and device.type == "cuda"
    model.to(memory_format=memory_format(device))
    bar = _progress_bar(layout, pending, elsewhere, job)
    writer = _Writer(store, cfg.queue_chunks, job.on_chunk)
    inputs = background(_view_batches(layout, pending, plan, data, cfg.batch_size, device), cfg.prefetch_batches)
    buffers: dict[str, np.ndarray] = {}
    try:
        for k, s, x in inputs:
            if writer.error is not None:
                break  # the store cannot take more: stop computing
            start, stop = layout.rows(k)
            n = (stop - start) * layout.num_views
            if s == 0:
                buffers = {name: np.empty((n, width), dtype=layout.dtype(name))
                           for name, width in layout.widths().items()}
            for buffer, value in zip(buffers.values(), teacher_outputs(model, x, align_cfg, use_autocast, layout.topk)):
                buffer[s:s + len(x)] = value  # (b, W) of the chunk's (n, W)
            bar.update(len(x))
            if s + len(x) == n:  # chunk k complete: hand it to the writer, start the next
                writer.submit((k, start, _checked_chunk(buffers, start, stop, layout.num_views, job.teacher)))
    finally:
        inputs.close()
        writer.finish()  # chunks already computed are still written: finished work is kept
        bar.close()
    writer.raise_error(store.path, job.teacher)


def _view_batches(layout: Layout, pending: list[int], plan: ViewPlan, data, batch_size: int,
                  device: torch.device) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(chunk, first flat index, normalized views) in chunk order, `batch_size` (sample, view) pairs at a
    time. The inputs move to `device` now; the views are replayed as it is iterated (on the prefetch thread)."""
    if data.source == "files":
        return _file_view_batches(layout, pending, plan, data, batch_size, device)
    images = data.images.to(device)  # (N, C, H, W) uint8, resident for the pass
    aug = torch.from_numpy(plan.aug).to(device)  # (N, V, P) int16
    mix = plan.mix.to(device) if plan.mix is not None else None  # (N, V, ...) each view's partner, lambda, box
    fmt, v_count = memory_format(device), layout.num_views

    def batches() -> Iterator[tuple[int, int, torch.Tensor]]:
        for k in pending:
            start, stop = layout.rows(k)
            n = (stop - start) * v_count  # (sample, view) pairs of the chunk, sample-major
            for s in range(0, n, batch_size):
                flat = torch.arange(s, min(n, s + batch_size), device=device)  # (b,)
                rows, views = start + flat // v_count, flat % v_count
                pairs = mix.take(rows, views) if mix is not None else None
                x = tensor_views(images, rows, aug[rows, views], plan.augment, pairs)  # (b, C, H, W) uint8, mixed
                yield k, s, normalize(x, data.mean, data.std).contiguous(memory_format=fmt)

    return batches()


def _file_view_batches(layout: Layout, pending: list[int], plan: ViewPlan, data: FileData, batch_size: int,
                       device: torch.device) -> Iterator[tuple[int, int, torch.Tensor]]:
    """As `_view_batches`, from files: each image is decoded once, in a worker process, for all V of its views
    (the chunks are sample-major), so a batch holds whole samples, batch_size // V of them (at least one)."""
    v_count, fmt = layout.num_views, memory_format(device)
    per = max(1, batch_size // v_count)  # samples per batch
    parts, batches, marks, at = [], [], [], 0  # the samples of each batch; their positions in `rows`; (chunk, start)
    for k in pending:
        start, stop = layout.rows(k)
        for first in range(start, stop, per):
            parts.append(np.arange(first, min(stop, first + per)))
            batches.append(np.arange(at, at + len(parts[-1])))
            marks.append((k, (first - start) * v_count))
            at += len(parts[-1])
    rows = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)  # every sample to decode, in order
    views = file_views(data, rows, plan.aug[rows], plan.augment, batches, pin=device.type == "cuda",
                       mix=plan.mix.take(rows) if plan.mix is not None else None)
    for (k, s), x in zip(marks, views):
        x = x.to(device, non_blocking=True)  # (r * V, 3, S, S) uint8
        yield k, s, normalize(x, data.mean, data.std).contiguous(memory_format=fmt)


def teacher_outputs(model, x: torch.Tensor, align_cfg, use_autocast: bool, topk: int = 0) -> list[np.ndarray]:
    """The arrays of one input batch, in `Layout.widths` order: the teacher's logits (b, C) as float16, or with
    `topk` its k largest logits (b, k) float16, their classes (b, k) uint16 and the log-sum-exp of all C logits
    (b, 1) float16; then the aligned blocks (b, L_i) float16."""
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=use_autocast):
        logits, feats = model(x)  # (b, C), [(b, C_i, H_i, W_i) or (b, D_i)]
        blocks = [b.to(torch.float16).cpu().numpy() for b in align_all(feats, align_cfg)]  # (b, L_i) per block
        logits = logits.float()
    if not topk:
        return [logits.to(torch.float16).cpu().numpy(), *blocks]
    values, classes = logits.topk(topk, dim=1)  # (b, k) each, largest first
    lse = torch.logsumexp(logits, dim=1, keepdim=True)  # (b, 1), in fp32 before rounding
    return [values.to(torch.float16).cpu().numpy(), classes.cpu().numpy().astype(np.uint16),
            lse.to(torch.float16).cpu().numpy(), *blocks]


def _checked_chunk(buffers: dict[str, np.ndarray], start: int, stop: int, views: int,
                   teacher: str) -> dict[str, np.ndarray]:
    """A finished chunk's (rows, V, W) arrays from its (rows x V, W) buffers; non-finite values stop the stage."""
    chunk = {name: buf.reshape(stop - start, views, -1) for name, buf in buffers.items()}
    bad = [name for name, value in chunk.items() if not np.isfinite(value).all()]
    if bad:
        raise UserError(f"teacher {teacher} produced non-finite values in {', '.join(bad)} "
                        f"(samples {start}-{stop - 1}; fp16 overflow?): check the checkpoint")
    return chunk


def _progress_bar(layout: Layout, pending: list[int], elsewhere: set[int], job: CacheJob) -> tqdm:
    """Views written by this process: its pending chunks to go, what is already done counted in."""
    views_of = lambda chunks: sum((b - a) * layout.num_views for a, b in map(layout.rows, chunks))  # noqa: E731
    total = views_of(set(range(layout.n_chunks)) - set(elsewhere))
    finished = views_of(set(range(layout.n_chunks)) - set(pending) - set(elsewhere))
    desc = f"cache {job.teacher}" + (" (rank 0)" if elsewhere else "")
    return tqdm(total=total, initial=finished, unit="view", desc=desc, disable=not (job.progress and job.world.main),
                smoothing=0.05)


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
            with disk_errors(f"writing cache {path} failed", f"fix the permissions of {path}",
                             f"rerun {rerun_hint(teacher, self.store.name, path=path)} to resume"):
                raise self.error
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
