"""Benchmark of the file source (data.source: files) against the memory source: memory and speed.

    python -m bench.files                                   # 2,000 and 20,000 generated JPEGs, about 25 min here
    python -m bench.files --images 4000 --small 400         # a quicker look

A. Memory, flat in the dataset's size: `plan_views`, `cache_teachers` and `distill` (kd, one epoch) run from files
   as subprocesses on generated folders of --small and --images training images (scripts/make_image_folder.py:
   JPEGs of 256 to 500 px a side, 10 classes, kept under --workdir between runs). A sampler adds up the PSS and
   the RSS of each stage's whole process tree (its DataLoader workers included) every 0.1 s: the RSS sum counts
   the pages a forked worker shares with its parent once per process (an upper bound), the PSS sum splits them.
   Goal: under 2 GB, and the large folder within 1.2x of the small one.
B. Speed, side by side in this process on the --small folder, --repeats interleaved rounds (medians of the
   per-round ratios): the cache pass (pipeline.cache.write.cache_teacher)
   at V = --views from files, for each worker count of --workers, against the same pass from memory (the folder
   loaded once as a tensor at --size, which that source needs first: its load time is shown apart). Goal: files
   at least 0.7x the views per second of memory. Then one distill epoch (kd from that cache) from memory, and from
   files for each worker count and a prefetch depth of 2 and 4 batches, images per second of the training steps
   (pinning is for a GPU: not measured here). And the decoder: PIL against torchvision.io, one thread, and PIL's
   decode plus one 224-px view per image (bench.scaleout's --decode-ms).
C. With --mix KIND (parts A and B skipped, their figures kept): the cache pass on mixed views (views.mix.kind KIND,
   every view mixed) against the same pass unmixed, from memory and from files, interleaved: a mixed view from
   files decodes its partner too.

The teacher is the tiny profile's (a student_cnn at width 0.5, randomly initialised, BatchNorm calibrated), a
cheap forward that leaves the decoding exposed: a real teacher makes the file source's share of the time smaller.
Results go to bench/results/<device>-files.json with the command and library versions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
import yaml

from bench.cache_io import fake_teacher
from bench.common import RESULTS, header, run_main, write_result
from pipeline import paths
from pipeline.cache import CacheConfig
from pipeline.cache.write import cache_teacher
from pipeline.config import UserError, build
from pipeline.data import DataConfig, clear_cache, load_split
from pipeline.data.files import clear_listings
from pipeline.device import setup_cpu
from pipeline.views import ViewsConfig, make_view_plan

REPO = Path(__file__).resolve().parents[1]
TEACHER = {"arch": "student_cnn", "width": 0.5}
RRC = {"kind": "rrc_flip", "flip": True, "scale_min": 0.25}


def generated(workdir: Path, images: int) -> Path:
    """A folder of `images` training JPEGs (10 classes, 256-500 px) and 100 test ones, written once."""
    root = workdir / f"jpegs_{images}"
    done = root / ".complete"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_image_folder.py"), "--out", str(root),
                        "--classes", "10", "--train-per-class", str(images // 10), "--test-per-class", "10",
                        "--min-side", "256", "--max-side", "500", "--grey-every", "25"], check=True)
        done.touch()
    return root


# ---------------------------------------------------------------- A. memory of the stages


class PeakRSS(threading.Thread):
    """The largest sums of RSS and of PSS over a process and its descendants, sampled every `every` seconds.

    RSS counts a page shared by a forked DataLoader worker and its parent once per process; PSS splits it
    between them, so the PSS sum is the memory the tree really holds and the RSS sum an upper bound."""

    def __init__(self, pid: int, every: float = 0.1):
        super().__init__(daemon=True)
        self.root, self.every, self.stop = psutil.Process(pid), every, threading.Event()
        self.rss = self.pss = 0
        self.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            rss = pss = 0
            for p in procs:
                try:
                    info = p.memory_full_info()
                    rss, pss = rss + info.rss, pss + info.pss
                except psutil.Error:
                    pass
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            time.sleep(self.every)


def stage_params(root: Path, size: int, views: int, workers: int) -> dict:
    params = yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())
    params["data"] = {"name": "imagefolder", "root": str(root.resolve()), "image_size": size, "source": "files",
                      "workers": workers}
    params["teachers"] = {"t": {"arch": TEACHER["arch"], "model": {"width": TEACHER["width"]}, "pretrain": {}}}
    params["views"] = {"num_views": views, "seed": 0, "augment": RRC}
    params["cache"].update(chunk_rows=1024, batch_size=512)
    params["distill"].update(teachers=["t"], epochs=1, seeds=[0], batch_size=128, runs={"kd": {"method": "kd"}})
    return params


STAGES = (("plan_views", []), ("cache_teachers", ["--teacher", "t", "--quiet"]),
          ("distill", ["--run", "kd", "--quiet", "--device", "cpu"]))  # in order, each in the work folder


def prepare(work: Path, params: dict) -> None:
    """A fresh `work` folder holding `params` and a teacher checkpoint that fits its data, as the pretrain stage
    would leave it."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    clear_cache()
    clear_listings()
    with contextlib.chdir(work):
        fake_teacher(paths.teacher_checkpoint("t"), load_split(build(DataConfig, params["data"], "data"), "train"),
                     TEACHER["arch"], TEACHER["width"])


def run_stage(work: Path, name: str, args: list[str], sample: bool) -> PeakRSS | None:
    """Run `python -m stages.NAME ARGS` in `work`; with `sample`, its process tree's peak memory meanwhile."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", f"stages.{name}", *args], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = PeakRSS(proc.pid) if sample else None
    output, _ = proc.communicate()
    if sampler is not None:
        sampler.stop.set()
        sampler.join()
    if proc.returncode != 0:
        raise UserError(f"stages.{name} failed in {work}: {output.strip().splitlines()[-1:]}")
    return sampler


def measure_stages(root: Path, work: Path, size: int, views: int, workers: int) -> dict:
    """Peak PSS and RSS sums (MiB) and wall time (s) of each stage from files, in `work` as the working directory."""
    prepare(work, stage_params(root, size, views, workers))
    out = {}
    for name, args in STAGES:
        start = time.perf_counter()
        sampler = run_stage(work, name, args, sample=True)
        out[name] = {"peak_pss_mib": round(sampler.pss / 2**20, 1), "peak_rss_mib": round(sampler.rss / 2**20, 1),
                     "wall_s": round(time.perf_counter() - start, 2)}
        print(f"  {name:15s} peak PSS {out[name]['peak_pss_mib']:7.1f} MiB  (RSS sum {out[name]['peak_rss_mib']:7.1f})"
              f"  {out[name]['wall_s']:7.1f} s")
    return out


# ---------------------------------------------------------------- B. speed, side by side


def cache_pass(data, views: int, work: Path, ckpt: Path, mix: str = "none") -> float:
    """Views per second of one cache pass over `data` (plan made before the clock starts), mixed by `mix`."""
    plan = make_view_plan(ViewsConfig(num_views=views, augment=RRC, mix={"kind": mix}), data)
    out = work / "speed.zarr"
    shutil.rmtree(out, ignore_errors=True)
    cfg = CacheConfig(chunk_rows=1024, batch_size=512, align={"kind": "channel", "length": 8})
    start = time.perf_counter()
    cache_teacher(ckpt, out, plan, data, cfg, progress=False)
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return len(data) * views / seconds


def measure_speed(root: Path, work: Path, size: int, views: int, worker_counts: list[int], repeats: int) -> dict:
    """The cache pass from memory and from files with each worker count, interleaved, `repeats` rounds: the ratio
    of each round's files pass to that round's memory pass, median and range (the machine drifts between rounds)."""
    work.mkdir(parents=True, exist_ok=True)
    memory_cfg = DataConfig(name="imagefolder", root=str(root.resolve()), image_size=size)
    start = time.perf_counter()
    clear_cache()
    memory = load_split(memory_cfg, "train")  # decode + resize every image once: the memory source's price
    load_s = time.perf_counter() - start
    out = {"memory_load_s": round(load_s, 2), "images": len(memory), "views": views, "size": size, "rounds": repeats}
    # a teacher per source (their fingerprints differ); the same weights, so the same work per view
    sources = {"memory": (memory, fake_teacher(work / "memory.pt", memory, TEACHER["arch"], TEACHER["width"]))}
    for workers in worker_counts:
        clear_listings()
        files = load_split(DataConfig(**{**memory_cfg.__dict__, "source": "files", "workers": workers}), "train")
        sources[str(workers)] = (files, fake_teacher(work / f"files{workers}.pt", files, TEACHER["arch"],
                                                     TEACHER["width"]))
    rates: dict[str, list[float]] = {name: [] for name in sources}
    for _ in range(repeats):
        for name, (data, ckpt) in sources.items():
            rates[name].append(cache_pass(data, views, work, ckpt))
    out["memory_views_per_s"] = round(statistics.median(rates["memory"]), 1)
    print(f"  memory: load {load_s:.1f} s, cache {out['memory_views_per_s']:.0f} views/s (median of {repeats})")
    out["files"] = {}
    for workers in map(str, worker_counts):
        ratios = [f / m for f, m in zip(rates[workers], rates["memory"])]
        out["files"][workers] = {"views_per_s": round(statistics.median(rates[workers]), 1),
                                 "ratio_to_memory": round(statistics.median(ratios), 3),
                                 "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)]}
        print(f"  files, {workers} worker(s): cache {out['files'][workers]['views_per_s']:.0f} views/s = "
              f"{out['files'][workers]['ratio_to_memory']:.2f}x memory (rounds {min(ratios):.2f}-{max(ratios):.2f})")
    return out


def measure_mix_speed(root: Path, work: Path, size: int, views: int, workers: int, repeats: int, mix: str) -> dict:
    """C: the cache pass on `mix` views against the same pass unmixed, from memory and from files (`workers`),
    interleaved, `repeats` rounds: the median of each round's mixed / unmixed ratio."""
    work.mkdir(parents=True, exist_ok=True)
    memory_cfg = DataConfig(name="imagefolder", root=str(root.resolve()), image_size=size)
    clear_cache()
    clear_listings()
    memory = load_split(memory_cfg, "train")
    files = load_split(DataConfig(**{**memory_cfg.__dict__, "source": "files", "workers": workers}), "train")
    out = {"mix": mix, "images": len(memory), "views": views, "size": size, "workers": workers, "rounds": repeats}
    for name, data in (("memory", memory), ("files", files)):
        ckpt = fake_teacher(work / f"{name}.pt", data, TEACHER["arch"], TEACHER["width"])
        rates = [(cache_pass(data, views, work, ckpt), cache_pass(data, views, work, ckpt, mix))
                 for _ in range(repeats)]  # (unmixed, mixed) views/s per round
        ratios = [m / u for u, m in rates]
        out[name] = {"unmixed_views_per_s": round(statistics.median(u for u, _ in rates), 1),
                     "mixed_views_per_s": round(statistics.median(m for _, m in rates), 1),
                     "mixed_to_unmixed": round(statistics.median(ratios), 3),
                     "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)]}
        print(f"  {name}: {mix} {out[name]['mixed_views_per_s']:.0f} views/s against unmixed "
              f"{out[name]['unmixed_views_per_s']:.0f} = {out[name]['mixed_to_unmixed']:.2f}x "
              f"(rounds {min(ratios):.2f}-{max(ratios):.2f})")
    return out


def decoder_speed(root: Path, images: int = 300) -> dict:
    """Milliseconds per image, one thread, to turn a JPEG of the folder into (3, H, W) uint8: the file source's
    decode (PIL) against torchvision.io (deprecated since torchvision 0.29), and whether they give the same pixels."""
    import warnings

    import numpy as np
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image, read_file

    warnings.filterwarnings("ignore", message="The image decoding", category=DeprecationWarning)  # the comparison

    from pipeline.data.files import decode

    files = sorted(root.glob("train/*/*.jpg"))[:images]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out, same = {}, True
        for _ in range(2):  # the second round, warm, is the one kept
            for name, read in (("pil", decode), ("torchvision_io", lambda f: decode_image(read_file(str(f)),
                                                                                          mode=ImageReadMode.RGB))):
                start = time.perf_counter()
                for f in files:
                    read(f)
                out[name] = round(1000 * (time.perf_counter() - start) / len(files), 3)
        for f in files[:50]:
            with Image.open(f) as img:
                same &= np.array_equal(np.asarray(img.convert("RGB")),
                                       decode_image(read_file(str(f)), mode=ImageReadMode.RGB).permute(1, 2, 0).numpy())
    finally:
        torch.set_num_threads(threads)
    out["same_pixels"] = bool(same)
    view = decode_and_view_ms(files)
    print(f"  decode, ms per image: PIL {out['pil']:.2f}, torchvision.io {out['torchvision_io']:.2f} "
          f"(same pixels: {same}); PIL decode + one {VIEW_PX}-px RandomResizedCrop view {view:.2f} "
          f"(what a distill epoch from files costs per image; bench.scaleout's --decode-ms)")
    return {"ms_per_image": out, "images": len(files), f"decode_and_view_{VIEW_PX}_ms": view}


VIEW_PX = 224  # the view side of the ImageNet recipes, for the per-image cost of an epoch from files


def decode_and_view_ms(files: list[Path]) -> float:
    """Milliseconds per image, one thread: PIL decode plus one planned ImageNet-style view (scale 0.08-1) cut and
    resized to VIEW_PX, as a distill or pretrain epoch from files does per image (warm second round kept)."""
    import numpy as np

    from pipeline.augment import AugmentConfig, plan_views, views_of_image
    from pipeline.data.files import decode

    cfg = AugmentConfig(kind="rrc_flip", flip=True, scale_min=0.08)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(2):
            start = time.perf_counter()
            for i, f in enumerate(files):
                image = decode(f)
                params = plan_views(cfg, 0, np.array([i]), np.array([0]), image.shape[1], image.shape[2])[0]
                views_of_image(image, torch.from_numpy(params), cfg, VIEW_PX)
            ms = 1000 * (time.perf_counter() - start) / len(files)
    finally:
        torch.set_num_threads(threads)
    return round(ms, 3)


def distill_speed(root: Path, work: Path, size: int, views: int, worker_counts: list[int], repeats: int,
                  prefetches: tuple[int, ...] = (2, 4)) -> dict:
    """Images per second of one kd epoch's training steps from memory, and from files for each decoding worker
    count and prefetch depth (the stage's own measure). The plan and cache are made once per source; then the
    distill stage reruns, every variant once a round for `repeats` rounds: medians, and the ratio to the round's
    memory run."""
    folders, variants = {}, {"memory": None}
    for source in ("memory", "files"):
        folders[source] = work / f"distill_{source}"
        params = stage_params(root, size, views, max(worker_counts))
        params["data"]["source"] = source
        prepare(folders[source], params)
        for name, args in STAGES:
            run_stage(folders[source], name, args, sample=False)
    files_params = yaml.safe_load((folders["files"] / "params.yaml").read_text())
    for workers in worker_counts:
        for prefetch in prefetches:
            variants[f"workers {workers} prefetch {prefetch}"] = {"workers": workers, "prefetch": prefetch}
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, data in variants.items():
            folder = folders["memory" if data is None else "files"]
            if data is not None:  # neither workers nor prefetch enters any identity: the cache stays valid
                files_params["data"].update(data)
                (folder / "params.yaml").write_text(yaml.safe_dump(files_params, sort_keys=False))
            shutil.rmtree(folder / paths.student_checkpoint("kd", 0).parent)  # a finished seed is never retrained
            run_stage(folder, "distill", list(STAGES[-1][1]), sample=False)
            speeds[name].append(_seed_speed(folder))
    out = {"rounds": repeats, "memory": {"images_per_s": statistics.median(speeds["memory"])}, "files": {}}
    print(f"  distill from memory: {out['memory']['images_per_s']:.0f} images/s (median of {repeats})")
    for name in list(variants)[1:]:
        ratios = [f / m for f, m in zip(speeds[name], speeds["memory"])]
        out["files"][name] = {"images_per_s": statistics.median(speeds[name]),
                              "ratio_to_memory": round(statistics.median(ratios), 3),
                              "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)]}
        print(f"  distill from files, {name}: {out['files'][name]['images_per_s']:.0f} images/s = "
              f"{out['files'][name]['ratio_to_memory']:.2f}x memory (rounds {min(ratios):.2f}-{max(ratios):.2f})")
    best = max(out["files"], key=lambda k: out["files"][k]["ratio_to_memory"])
    out["best_files"] = best
    out["files_to_memory"] = out["files"][best]["ratio_to_memory"]
    return out


def _seed_speed(folder: Path) -> float:
    seed = yaml.safe_load((folder / paths.student_seed_metrics("kd", 0)).read_text())
    return round(seed["images_per_s"], 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.files", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000, help="training images of the large folder")
    parser.add_argument("--small", type=int, default=2000, help="training images of the small folder")
    parser.add_argument("--views", type=int, default=8, help="V, views per image")
    parser.add_argument("--size", type=int, default=64, help="the views' side (pixels)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3], help="DataLoader workers to try")
    parser.add_argument("--workdir", type=Path, default=Path("datasets/bench_files"), help="folders and stages")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the interleaved speed runs (medians)")
    parser.add_argument("--skip-memory", action="store_true", help="part B only")
    parser.add_argument("--skip-speed", action="store_true", help="part A only")
    parser.add_argument("--mix", default=None, choices=["mixup", "cutmix", "both"],
                        help="part C only: the cache pass on mixed views against unmixed (workers: the largest)")
    parser.add_argument("--out", type=Path, default=None)
    a = parser.parse_args(argv)
    if (not (10 <= a.small <= a.images) or a.views < 1 or not 8 <= a.size <= 1024 or min(a.workers) < 0
            or a.repeats < 1):
        raise UserError("need 10 <= --small <= --images, --views >= 1, 8 <= --size <= 1024, --workers >= 0, "
                        "--repeats >= 1")
    a.workdir = a.workdir.resolve()  # the stages run in folders of their own
    setup_cpu()
    result = {**header("files", torch.device("cpu"), argv, ("torch", "torchvision", "pillow")),
              "teacher": TEACHER, "augment": RRC}
    small = generated(a.workdir, a.small)
    if a.mix:
        a.skip_memory = a.skip_speed = True
        print(f"C. {a.mix} views on {a.small:,} images, V = {a.views}, {a.size} px:")
        result["mix_speed"] = measure_mix_speed(small, a.workdir / "speed", a.size, a.views, max(a.workers),
                                                a.repeats, a.mix)
    if not a.skip_memory:
        large = generated(a.workdir, a.images)
        result["memory"] = {}
        for n, root in ((a.small, small), (a.images, large)):
            print(f"A. stages from files, {n:,} images:")
            result["memory"][str(n)] = measure_stages(root, a.workdir / f"stages_{n}", a.size, a.views,
                                                      max(a.workers))
        big, little = result["memory"][str(a.images)], result["memory"][str(a.small)]
        result["memory_ratio"] = {f"{s} {m}": round(big[s][f"peak_{m}_mib"] / little[s][f"peak_{m}_mib"], 3)
                                  for s in big for m in ("pss", "rss")}
        print("   peak, large / small: " + ", ".join(f"{s} {r:.2f}x" for s, r in result["memory_ratio"].items()))
    if not a.skip_speed:
        print(f"B. speed on {a.small:,} images, V = {a.views}, {a.size} px:")
        result["decode"] = decoder_speed(small)
        result["cache_speed"] = measure_speed(small, a.workdir / "speed", a.size, a.views, a.workers, a.repeats)
        result["distill_speed"] = distill_speed(small, a.workdir / "speed", a.size, a.views, a.workers, a.repeats)
    out = a.out or RESULTS / f"{result['device']}-files.json"
    if out.exists() and (a.skip_memory or a.skip_speed):  # one part rerun: keep the other's figures and command
        kept = json.loads(out.read_text())
        part = "mix" if a.mix else "memory" if a.skip_speed else "speed"
        result = {**{k: v for k, v in kept.items() if k not in result}, **result,
                  f"{part}_command": result["command"]}
    write_result(result, "files", out)
    return result


if __name__ == "__main__":
    run_main(main)
