"""Benchmark of the teacher cache: stage overhead, bytes on disk, view-slab reads against a numpy memmap.

    python -m bench.cache_io                      # small synthetic setup, a few minutes on 2 CPU cores
    python -m bench.cache_io --sweep              # + chunk rows x codec grid (how CacheConfig's defaults were chosen)
    python -m bench.cache_io --cache data/cache/resnet18.zarr --cache data/cache/vgg16.h5   # real caches

Everything is measured side by side in one run and printed as a table, also written to
bench/results/<device>-cache_io.json with the device, library versions and the command.

A. Stage overhead: the whole cache stage (pipeline.cache.write.cache_teacher: checkpoint load, view
   replay, forward, alignment pooling, fp16, chunked writes on a writer thread) against the bare
   teacher forward over the same views with the same batch size: the inputs made before the clock
   starts and the outputs dropped (also shown: replay + forward run one after the other). Goal <= 1.15x.
   The synthetic setup uses 4 chunks of N/4 rows, so the writer overlaps the forward as it does on
   the real data (60000 rows in chunks of 8192). Its chunks hold far fewer views than real ones
   (2048 against 65536), so zarr's fixed cost per chunk file weighs more here than there.
B. Slab reads at Fashion-MNIST scale (N=60000, V=8, C=10, 3 blocks x L=32, the CacheConfig defaults):
   one view slab `[:, v]` of every array from zarr and from h5 against `np.array(memmap[:, v])` of
   the same (N, V, W) arrays in .npy files. All reads are warm (page cache), best of several.
C. Checksum cost: every chunk carries a checksum (zarr v3 crc32c codec, HDF5 Fletcher32), verified on
   every read (CacheConfig.checksum). The whole cache stage of A with `checksum: true` against
   `checksum: false`, and one view slab of every array at B's scale from a checksummed store against
   an unchecksummed one (both through pipeline.cache.store.read_view, chunk by chunk, with its NaN
   check), both formats. Ratios are taken within each repeat, the order of the pair flipped every
   repeat; the median is reported. Goal: checksummed within 1.05x of unchecksummed.
D. --sweep: slab read and write speed, and size, for chunk rows x codec, both formats.

Its synthetic helpers (`synthetic_data`, `fake_teacher`) are shared with the tests.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import header, run_main, sync, write_result
from pipeline.augment import apply_views, normalize
from pipeline.cache import CacheConfig, open_cache
from pipeline.cache.store import FORMATS, Layout, create_store, open_store, read_view
from pipeline.cache.write import cache_teacher
from pipeline.checkpoints import save_checkpoint
from pipeline.models import load_teacher
from pipeline.data import ImageData, eval_views
from pipeline.device import memory_format, resolve_device, setup_cpu
from pipeline.models import build_model
from pipeline.views import ViewsConfig, make_view_plan



# ---------------------------------------------------------------- synthetic setup (also used by the tests)


def synthetic_data(n: int = 128, num_classes: int = 10, size: int = 28, channels: int = 1, seed: int = 0) -> ImageData:
    """Structured uint8 images: a class-dependent stripe pattern plus noise, so a model's outputs vary."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=gen)  # (N,)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    angle = labels.float()[:, None, None] * (3.1416 / num_classes)  # (N, 1, 1)
    stripes = torch.sin((xx * torch.cos(angle) + yy * torch.sin(angle)) * 0.7)  # (N, H, W)
    noise = torch.rand(n, channels, size, size, generator=gen)
    images = (stripes[:, None] * 80 + 120 + noise * 60).clamp(0, 255).to(torch.uint8)  # (N, C, H, W)
    return ImageData(images=images.contiguous(), labels=labels, classes=[f"c{i}" for i in range(num_classes)],
                     name="synthetic", split="train", mean=(0.5,) * channels, std=(0.25,) * channels)


def fake_teacher(path: str | Path, data: ImageData, arch: str = "student_cnn", width: float = 0.25,
                 seed: int = 0, name: str | None = None) -> Path:
    """A randomly initialised zoo model saved as a finished teacher checkpoint (the contract's schema)."""
    torch.manual_seed(seed)
    kwargs = {"num_classes": data.num_classes, "in_channels": data.in_channels, "width": width}
    model = build_model(arch, **kwargs)
    calibrate_batchnorm(model, data)
    path = Path(path)
    save_checkpoint(path, {
        "teacher": name or path.stem, "arch": arch, "model_kwargs": kwargs, "model": model.state_dict(),
        "optimizer": {}, "config": {}, "data": {"name": data.name}, "dataset_fingerprint": data.fingerprint,
        "epoch": 1, "finished": True, "test_acc": 0.0, "history": [],
    })
    return path


def calibrate_batchnorm(model: torch.nn.Module, data: ImageData, images: int = 128) -> None:
    """BatchNorm running statistics measured on `images` training images, as training leaves them.

    With the init's statistics (mean 0, variance 1) an untrained deep net's activations grow layer by
    layer in eval mode: a random densenet_cifar's logits overflowed fp16 (the cache's storage type). Measured
    statistics keep every layer's output at the scale a trained teacher's has."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    x = normalize(next(eval_views(data, torch.device("cpu"), images)), data.mean, data.std)  # (n, C, H, W)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = None  # a cumulative average: one batch sets the statistics outright
    model.train()
    with torch.no_grad():
        model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


# ---------------------------------------------------------------- A. stage overhead


def bare_forward(checkpoint: Path, plan, data: ImageData, batch_size: int, chunk_rows: int, device: torch.device,
                 replay: bool) -> float:
    """Seconds for the teacher forward over every planned view, nothing kept.

    The batches are the cache stage's: `batch_size` (sample, view) pairs, never straddling a chunk of
    `chunk_rows` samples (batch size changes CPU throughput by tens of percent, so it must match).
    replay=False: the inputs (replayed, normalized views) are made before the clock starts, so only
    the forward is timed, the strictest baseline. replay=True: view replay + forward, one after another.
    """
    model, _ = load_teacher(checkpoint, device)
    fmt = memory_format(device)
    model.to(memory_format=fmt)
    images = data.images.to(device)
    aug = torch.from_numpy(plan.aug).to(device)
    n, v = plan.aug.shape[:2]

    def make(s: int, stop: int) -> torch.Tensor:
        flat = torch.arange(s, stop, device=device)  # flat (sample, view) indices, sample-major
        rows, views = flat // v, flat % v
        x = normalize(apply_views(images[rows], aug[rows, views], plan.augment), data.mean, data.std)
        return x.contiguous(memory_format=fmt)

    spans = [(s, min(c + chunk_rows * v, n * v, s + batch_size))
             for c in range(0, n * v, chunk_rows * v) for s in range(c, min(c + chunk_rows * v, n * v), batch_size)]
    ready = None if replay else [make(*span) for span in spans]
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for i, span in enumerate(spans):
            model(make(*span) if replay else ready[i])
    sync(device)
    return time.perf_counter() - start


def stage_overhead(args, work: Path, device: torch.device) -> dict:
    data = synthetic_data(args.samples, seed=0)
    plan = make_view_plan(ViewsConfig(num_views=args.views), data)
    ckpt = fake_teacher(work / "teacher.pt", data, args.arch, args.width)
    rows = args.chunk_rows or max(1, args.samples // 4)
    # per format (zarr, h5...): the stage as configured by default (checksummed chunks); <format>_nock: checksum off
    times: dict[str, list[float]] = {"bare": [], "replay": [], **{k: [] for f in FORMATS for k in (f, f"{f}_nock")}}
    sizes = {}
    bare_forward(ckpt, plan, data, args.batch_size, rows, device, replay=False)  # warm-up (allocator, kernels)
    for i in range(args.repeats):  # interleaved, so drifting machine load hits every variant alike
        times["bare"].append(bare_forward(ckpt, plan, data, args.batch_size, rows, device, replay=False))
        times["replay"].append(bare_forward(ckpt, plan, data, args.batch_size, rows, device, replay=True))
        for fmt in FORMATS:
            # the checksummed and unchecksummed stage back to back, which one first flipped every repeat
            for checksum in ((True, False) if i % 2 == 0 else (False, True)):
                key = fmt if checksum else f"{fmt}_nock"
                out = work / f"stage.{fmt}" if checksum else work / f"stage-nock.{fmt}"
                shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
                cfg = CacheConfig(format=fmt, batch_size=args.batch_size, chunk_rows=rows, checksum=checksum)
                start = time.perf_counter()
                cache_teacher(ckpt, out, plan, data, cfg, device, progress=False)
                times[key].append(time.perf_counter() - start)
                sizes[key] = _disk_bytes(out)
    # Ratios are taken within each repeat (runs seconds apart see the same machine load; a shared
    # CPU's speed drifts within a minute) and the median is reported; times are the best of the repeats.
    best = {k: min(v) for k, v in times.items()}
    ratio = {k: float(np.median(np.array(v) / np.array(times["bare"]))) for k, v in times.items()}
    n_views = args.samples * args.views
    return {
        "samples": args.samples, "views": args.views, "arch": args.arch, "width": args.width,
        "batch_size": args.batch_size, "chunk_rows": rows, "repeats": args.repeats, "times_s": times,
        "bare_forward_s": best["bare"], "bare_views_per_s": n_views / best["bare"],
        "replay_forward_s": best["replay"], "replay_ratio": ratio["replay"],
        **{f"{f}_stage_s": best[f] for f in FORMATS},
        **{f"{f}_ratio": ratio[f] for f in FORMATS},
        **{f"{f}_bytes_per_sample_view": sizes[f] / n_views for f in FORMATS},
        "checksum": {f: _pair(times[f], times[f + "_nock"], sizes[f] / n_views, sizes[f + "_nock"] / n_views)
                     for f in FORMATS},
        "payload_bytes_per_sample_view": 2 * sum(Layout(1, 1, data.num_classes, ("b1", "b2", "b3"), (32,) * 3,
                                                        1, "none").widths().values()),
    }


# ---------------------------------------------------------------- B. slab reads against a memmap


def slab_reads(stores: dict[str, Path], work: Path, repeats: int) -> list[dict]:
    """For each store: read one view slab of every array, against np.array(memmap[:, v]) of the same arrays."""
    rows = []
    for label, path in stores.items():
        cache = open_cache(path)
        names = ["logits", *cache.blocks]
        npy = {}
        for name in names:  # the memmap baseline: the same (N, V, W) fp16 arrays as plain .npy files
            npy[name] = work / f"{path.name}-{name}.npy"
            np.save(npy[name], np.asarray(cache.array(name)[...]))
        view = cache.num_views // 2
        nbytes = sum(cache.num_samples * (cache.num_classes if n == "logits" else cache.dims[n]) * 2 for n in names)

        def read_store() -> None:
            cache.view_slab(view)

        def read_memmap() -> None:
            for name in names:
                np.array(np.load(npy[name], mmap_mode="r")[:, view])

        t_store, t_mm = _best(read_store, repeats), _best(read_memmap, repeats)
        rows.append({
            "store": label, "path": str(path), "format": cache.format, "samples": cache.num_samples,
            "views": cache.num_views, "chunk_rows": cache.attrs.get("chunk_rows"), "codec": cache.attrs.get("codec"),
            "slab_mb": nbytes / 1e6, "store_ms": t_store * 1e3, "memmap_ms": t_mm * 1e3,
            "store_mb_s": nbytes / t_store / 1e6, "memmap_mb_s": nbytes / t_mm / 1e6, "ratio": t_store / t_mm,
            "bytes_per_sample_view": _disk_bytes(path) / (cache.num_samples * cache.num_views),
        })
        cache.close()
    return rows


def fashion_scale_stores(work: Path, source: Path, n: int = 60000, v: int = 8,
                         checksum: bool = True) -> dict[str, Path]:
    """Stores of Fashion-MNIST size with the default layout (`checksum`: chunk checksums on, the default),
    filled by tiling a small real cache's values."""
    cfg = CacheConfig(checksum=checksum)
    small = open_cache(source)
    arrays = {"logits": np.asarray(small.array("logits")[...])}
    arrays.update({f"features/{b}": np.asarray(small.array(b)[...]) for b in small.blocks})
    rows = -(-n // -(-n // cfg.chunk_rows))  # balanced as pipeline.cache.write does
    attrs = {**small.attrs, "num_samples": n, "num_views": v, "chunk_rows": rows, "codec": cfg.codec}
    lengths = tuple(small.dims[b] for b in small.blocks)
    layout = Layout(n, v, small.num_classes, tuple(small.blocks), lengths, rows, cfg.codec, cfg.checksum)
    attrs.update(layout.to_attrs())
    small.close()
    reps = (-(-n // arrays["logits"].shape[0]), -(-v // arrays["logits"].shape[1]), 1)
    full = {k: np.tile(a, reps)[:n, :v] for k, a in arrays.items()}  # (n, v, W)
    out = {}
    for fmt in FORMATS:
        path = work / (f"fashion-scale.{fmt}" if checksum else f"fashion-scale-nock.{fmt}")
        store = create_store(path, layout, attrs)
        for k in range(layout.n_chunks):
            a, b = layout.rows(k)
            store.write_rows(a, {name: x[a:b] for name, x in full.items()})
            store.mark_done(k)
        store.update_attrs({"complete": True})
        store.close()
        out[f"{fmt} N={n} V={v}" + ("" if checksum else " no checksum")] = path
    return out


# ---------------------------------------------------------------- C. checksum cost of a slab read


def checksum_reads(checked: dict[str, Path], unchecked: dict[str, Path], repeats: int) -> dict[str, dict]:
    """One view slab of every array, checksummed store against unchecksummed, per format (pairs in order).

    Both go through TeacherCache.view_slab, i.e. pipeline.cache.store.read_view chunk by chunk with its
    NaN check; only the checksum differs. Interleaved repeats, the pair's order flipped every repeat."""
    out = {}
    for (label, path), nock in zip(checked.items(), unchecked.values()):
        caches = {True: open_cache(path), False: open_cache(nock)}
        assert caches[True].attrs.get("checksum") and not caches[False].attrs.get("checksum")
        view = caches[True].num_views // 2
        for c in caches.values():
            c.view_slab(view)  # warm: page cache, lazily opened arrays
        times: dict[bool, list[float]] = {True: [], False: []}
        for i in range(repeats):
            for checksum in ((True, False) if i % 2 == 0 else (False, True)):
                start = time.perf_counter()
                caches[checksum].view_slab(view)
                times[checksum].append(time.perf_counter() - start)
        out[caches[True].format] = {"store": label, **_pair(times[True], times[False],
                                                           _disk_bytes(path) / (caches[True].num_samples * caches[True].num_views),
                                                           _disk_bytes(nock) / (caches[True].num_samples * caches[True].num_views))}
        for c in caches.values():
            c.close()
    return out


def _pair(checked: list[float], unchecked: list[float], bytes_checked: float, bytes_unchecked: float) -> dict:
    """Checksummed against unchecksummed timings taken pairwise: best times, median ratio within a pair."""
    ratios = np.array(checked) / np.array(unchecked)
    return {"checksum_s": min(checked), "no_checksum_s": min(unchecked), "ratio": float(np.median(ratios)),
            "ratio_iqr": [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))],
            "ratio_of_best": min(checked) / min(unchecked), "ratios": ratios.tolist(),
            "times_s": {"checksum": checked, "no_checksum": unchecked},
            "bytes_per_sample_view": bytes_checked, "no_checksum_bytes_per_sample_view": bytes_unchecked}


# ---------------------------------------------------------------- D. chunk rows x codec sweep


def sweep(work: Path, source: Path | None, n: int, v: int, repeats: int) -> list[dict]:
    if source is not None:  # real teacher outputs (compression depends on them)
        cache = open_cache(source)
        arrays = {"logits": np.asarray(cache.array("logits")[...])}
        arrays.update({f"features/{b}": np.asarray(cache.array(b)[...]) for b in cache.blocks})
        cache.close()
    else:  # stand-ins: logits ~ N(0, 4^2); post-ReLU pooled features, positive, some exact zeros
        rng = np.random.default_rng(0)
        arrays = {"logits": (rng.standard_normal((n, v, 10)) * 4).astype(np.float16)}
        for b in ("block1", "block2", "block3"):
            arrays[f"features/{b}"] = np.maximum(rng.lognormal(-1, 1, (n, v, 32)) - 0.2, 0).astype(np.float16)
    n, v = arrays["logits"].shape[:2]
    total = sum(a.nbytes for a in arrays.values())
    blocks = tuple(k.split("/")[1] for k in arrays if k != "logits")
    rows_out = []
    for fmt, store_format in FORMATS.items():
        for codec in store_format.codecs:
            for rows in (1024, 4096, 8192, 16384, 65536):
                lengths = tuple(arrays[f"features/{b}"].shape[2] for b in blocks)
                layout = Layout(n, v, arrays["logits"].shape[2], blocks, lengths, min(rows, n), codec)
                path = work / f"sweep-{rows}-{codec}.{fmt}"
                start = time.perf_counter()
                store = create_store(path, layout, {"num_samples": n})
                for k in range(layout.n_chunks):
                    a, b = layout.rows(k)
                    store.write_rows(a, {name: x[a:b] for name, x in arrays.items()})
                    store.mark_done(k)
                store.close()
                t_write = time.perf_counter() - start
                size = _disk_bytes(path)
                store = open_store(path)
                t_read = _best(lambda: [read_view(store, layout, name, v // 2) for name in arrays], repeats)
                store.close()
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                rows_out.append({"format": fmt, "codec": codec, "chunk_rows": rows, "write_mb_s": total / t_write / 1e6,
                                 "compression": total / size, "slab_read_mb_s": total / v / t_read / 1e6,
                                 "slab_read_ms": t_read * 1e3})
                print(_fmt_row(rows_out[-1]), flush=True)
    return rows_out


# ---------------------------------------------------------------- helpers and main


def _best(fn, repeats: int) -> float:
    fn()  # warm: page cache, lazily opened arrays
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _fmt_row(row: dict) -> str:
    return "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.cache_io", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2048, help="synthetic samples for the stage timing")
    parser.add_argument("--views", type=int, default=4, help="views per sample for the stage timing")
    parser.add_argument("--arch", default="student_cnn", help="zoo architecture of the synthetic teacher")
    parser.add_argument("--width", type=float, default=1.0, help="its width multiplier")
    parser.add_argument("--batch-size", type=int, default=512, help="(sample, view) pairs per forward")
    parser.add_argument("--chunk-rows", type=int, default=0, help="chunk rows for the stage timing (0 = samples/4)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (median ratio, best time)")
    parser.add_argument("--read-repeats", type=int, default=21,
                        help="timed repeats of the checksummed against unchecksummed slab reads")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--cache", action="append", default=[], type=Path,
                        help="also measure slab reads of this existing cache (repeatable)")
    parser.add_argument("--no-fashion-scale", action="store_true", help="skip the N=60000 slab-read stores")
    parser.add_argument("--sweep", action="store_true", help="also run the chunk rows x codec grid")
    parser.add_argument("--sweep-samples", type=int, default=60000, help="rows of the synthetic sweep arrays")
    parser.add_argument("--sweep-views", type=int, default=4, help="views of the synthetic sweep arrays")
    parser.add_argument("--sweep-from", type=Path, default=None, help="sweep over this cache's values instead")
    parser.add_argument("--out", type=Path, default=None, help="results JSON [bench/results/<device>-cache_io.json]")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    setup_cpu()
    work = Path(tempfile.mkdtemp(prefix="cache_io-"))
    try:
        print(f"A. stage vs bare forward: {args.samples} synthetic samples x {args.views} views, "
              f"{args.arch} width {args.width}, {device}", flush=True)
        stage = stage_overhead(args, work, device)
        stores = {} if args.no_fashion_scale else fashion_scale_stores(work, work / "stage.zarr")
        unchecked = {} if args.no_fashion_scale else fashion_scale_stores(work, work / "stage.zarr", checksum=False)
        checked = dict(stores)
        stores.update({str(p): p for p in args.cache})
        print("B. view slab reads", flush=True)
        reads = slab_reads(stores, work, repeats=5)
        print("C. checksummed vs unchecksummed slab reads", flush=True)
        check_reads = checksum_reads(checked, unchecked, args.read_repeats)
        grid = sweep(work, args.sweep_from, args.sweep_samples, args.sweep_views, 3) if args.sweep else []
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'cache stage vs bare teacher forward':<44}{'best s':>10}{'ratio':>8}{'bytes/(sample,view)':>22}")
    print(f"{'  bare forward (' + format(stage['bare_views_per_s'], '.0f') + ' views/s, inputs ready)':<44}"
          f"{stage['bare_forward_s']:>10.2f}{1.0:>8.2f}{stage['payload_bytes_per_sample_view']:>22.0f}")
    print(f"{'  view replay + forward, serial':<44}{stage['replay_forward_s']:>10.2f}{stage['replay_ratio']:>8.2f}")
    for fmt in FORMATS:
        print(f"{'  cache stage -> ' + fmt:<44}{stage[fmt + '_stage_s']:>10.2f}{stage[fmt + '_ratio']:>8.2f}"
              f"{stage[fmt + '_bytes_per_sample_view']:>22.0f}")
    print("  (ratio: median over the repeats of stage / bare forward measured back to back)")
    print()
    print(f"{'view slab read':<44}{'MB':>8}{'store MB/s':>12}{'memmap MB/s':>13}{'ratio':>8}{'B/(s,v)':>9}")
    for r in reads:
        print(f"{'  ' + r['store'][-42:]:<44}{r['slab_mb']:>8.2f}{r['store_mb_s']:>12.0f}{r['memmap_mb_s']:>13.0f}"
              f"{r['ratio']:>8.2f}{r['bytes_per_sample_view']:>9.0f}")
    print()
    print(f"{'checksum (crc32c zarr / Fletcher32 h5)':<44}{'on':>10}{'off':>10}{'ratio':>8}{'IQR':>14}")
    checksum = {"goal_ratio": 1.05, "stage": stage["checksum"], "slab_read": check_reads}
    for what, unit, scale in (("stage", "s", 1.0), ("slab_read", "ms", 1e3)):
        for fmt, r in checksum[what].items():
            label = f"  {'cache stage' if what == 'stage' else 'one view slab, every array'} -> {fmt} ({unit})"
            print(f"{label:<44}{r['checksum_s'] * scale:>10.2f}{r['no_checksum_s'] * scale:>10.2f}{r['ratio']:>8.3f}"
                  f"{format(r['ratio_iqr'][0], '.3f') + '-' + format(r['ratio_iqr'][1], '.3f'):>14}")
    print(f"  (on/off: best times; ratio: median over {args.repeats} stage / {args.read_repeats} read pairs of "
          f"checksummed / unchecksummed back to back; goal <= {checksum['goal_ratio']})")
    result = {**header("cache_io", device, argv, ("torch", "numpy", "zarr", "h5py")),
              "stage": stage, "slab_reads": reads, "checksum": checksum, "sweep": grid}
    write_result(result, "cache_io", args.out)
    return result


if __name__ == "__main__":
    run_main(main)
