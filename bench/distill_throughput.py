"""Benchmark: distilling from the cache at the student's own training speed, and against online MEAL.

    python -m bench.distill_throughput                                  # default profile, synthetic data
    python -m bench.distill_throughput --params profiles/gpu.yaml --device cuda --teachers 4   # ResNet-18 student
    python -m bench.distill_throughput --params profiles/gpu.yaml --device cuda                # the 5-teacher zoo
    python -m bench.distill_throughput --breakdown      # + MEAL without its game, and on the logits alone

Three trainings of the params' student on the same synthetic images, views, batch size and steps:
  (a) scratch: the student alone (cross-entropy), the speed every method is held to;
  (b) cached: the params' method (MEAL by default): student plus discriminators, targets gathered from
      view slabs that real zarr teacher caches (pipeline.cache.write) hold, loaded and prefetched as
      `stages.distill` does;
  (c) online: the same method with the same teachers run live on every batch (`stages.distill --online`).
The trainings run in lock-step: one real step of each (pipeline.distill.epoch_steps, the loop
train_one_epoch runs), in rotating order, then the next, so every variant sees the same drift of this
shared machine to within a step (timing whole epochs in turn left seconds between the variants, and
their ratios moved with the machine). On CUDA a turn is `--chunk`
8 steps, synced only around the turn, so the host still runs ahead of the GPU as in training. Each
lane moves on to its next epoch (and view) when one ends; the slab switch at an epoch start is timed
apart and reported per epoch, since a real epoch amortises it over many more steps than the benchmark's. After `--warmup` untimed steps each, `--rounds` steps each are
timed; ratios are sums of step times over blocks of about one epoch's steps, reported as the median
over blocks with its interquartile range.
`--breakdown` adds (d) the cached method without its discriminators and, for MEAL, (e) its KL on the
logits alone, stepped with the rest, so the table shows what the game and the block similarities
each add to the step.

The teachers are randomly initialised zoo models of the params' architectures and widths (speed does
not depend on what they learned). Writes bench/results/<device>-distill_throughput.json with the
device, library versions, the command and every turn's time.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.cache_io import fake_teacher, synthetic_data
from bench.common import header, run_main, sync, write_result
from pipeline.align import AlignConfig
from pipeline.cache import CacheConfig, open_cache
from pipeline.cache.write import cache_teacher
from pipeline.models import load_teacher
from pipeline.config import DEFAULT_PARAMS, build, load_params, section
from pipeline.distill import DistillConfig, StudentConfig, TrainSet, build_trainer, epoch_steps, steps_per_epoch
from pipeline.methods import make_method, method_configs
from pipeline.models import NUM_BLOCKS, build_model, count_parameters
from pipeline.device import resolve_device, setup_cpu
from pipeline.cache.slabs import CachedTargets, CacheSlabs, EpochReads, NoTargets, OnlineTargets, SlabLoader
from pipeline.views import ViewsConfig, make_view_plan

# input shape and classes of each dataset the params may name (imagefolder: data.image_size, 3 channels)
SHAPES = {"fashion_mnist": (1, 28, 10), "cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "svhn": (3, 32, 10)}


def setup(args, params: dict, work: Path, device: torch.device) -> dict:
    """Synthetic data, view plan, teacher checkpoints and their caches; the three runs ready to train."""
    data_cfg = section(params, "data")
    channels, size, classes = SHAPES.get(data_cfg["name"], (3, int(data_cfg.get("image_size", 32)), 10))
    data = synthetic_data(args.samples, num_classes=classes, size=size, channels=channels)
    views = build(ViewsConfig, {**section(params, "views"), "num_views": args.views}, "views")
    plan_views = make_view_plan(views, data)
    cache_cfg = build(CacheConfig, {**section(params, "cache"), "chunk_rows": max(1, args.samples // 4)}, "cache")
    align_cfg = build(AlignConfig, cache_cfg.align, "cache.align")

    listed = section(params, "teachers")
    names = list(args.teacher or listed)[: args.teachers or None]
    caches, checkpoints = {}, {}
    for i, name in enumerate(names):
        spec = listed[name]
        width = float(spec.get("model", {}).get("width", 1.0))  # every zoo model's only shape knob
        ckpt = fake_teacher(work / f"{name}.pt", data, spec["arch"], width, seed=i, name=name)
        out = work / f"{name}.zarr"
        start = time.perf_counter()
        cache_teacher(ckpt, out, plan_views, data, cache_cfg, device, progress=False)
        print(f"  cached {name} ({spec['arch']} {spec.get('model', {})}): {args.samples} x {args.views} views "
              f"in {time.perf_counter() - start:.1f}s", flush=True)
        caches[name], checkpoints[name] = open_cache(out), ckpt

    student_cfg = build(StudentConfig, section(params, "student"), "student")
    distill_section = {k: v for k, v in section(params, "distill").items() if k != "runs"}
    # every lane's epochs have at least one step, so this many epochs outlast the steps the bench takes
    overrides = {"epochs": args.warmup + args.rounds + 1,
                 "compile": distill_section.get("compile", False) if args.compile is None else args.compile}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    train = TrainSet(data.images.to(device), data.labels.to(device), plan_views.aug, plan_views.augment,
                     data.mean, data.std)

    def make(method: str, online: bool, options_override: dict | None = None):
        section_ = {**distill_section, **overrides, "method": method}
        if options_override:  # --breakdown: the method with parts of its step switched off
            section_[method] = {**section_.get(method, {}), **options_override}
        cfg = build(DistillConfig, section_, "distill")
        options = method_configs(cfg, names)[method]
        teachers = names if method != "scratch" else []
        distiller = make_method(method, options, teachers, caches[names[0]].blocks if names else None)
        torch.manual_seed(0)
        kwargs = {"num_classes": classes, "in_channels": channels, **student_cfg.model}
        student = build_model(student_cfg.arch, **kwargs)
        trainer = build_trainer(distiller, cfg, student, classes, align_cfg, device)
        if method == "scratch":
            return trainer, NoTargets()
        if online:
            models = [load_teacher(checkpoints[n], device)[0] for n in names]
            return trainer, OnlineTargets(models, align_cfg, distiller.feature_blocks, device, cache_cfg.autocast)
        loader = SlabLoader(CacheSlabs({n: caches[n] for n in names}), distiller.feature_blocks, device)
        return trainer, CachedTargets(loader)

    runs = {"a_scratch": make("scratch", False), "b_cached": make(args.method, False),
            "c_online": make(args.method, True)}
    if args.breakdown:
        for key, (_, options) in breakdown(args.method).items():
            runs[key] = make(args.method, False, options)
    return {"runs": runs, "train": train, "teachers": names, "student": student_cfg,
            "student_params": count_parameters(runs["a_scratch"][0].student), "shape": (channels, size, classes)}


def breakdown(method: str) -> dict[str, tuple[str, dict]]:
    """--breakdown: the cached method with parts of its step switched off, to show what each part costs.

    Variant key -> (label, overrides of the method's options). Methods without a game have none.
    """
    if method not in ("meal", "meal_v2", "anc"):
        return {}
    out = {"d_no_game": (f"(d) {method}, no discriminators", {"adversarial": "none"})}
    if method == "meal":  # (e) = KL on the logits alone: what every block's alignment and similarity add
        out["e_logits_only"] = ("(e) meal, logits only", {"adversarial": "none", "block_weights": [0.0] * NUM_BLOCKS})
    return out


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartile (both the value itself when there is only one)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


class Lane:
    """One variant trained step by step across epochs, as pipeline.distill trains it (evaluation aside)."""

    def __init__(self, trainer, targets, train: TrainSet, device: torch.device):
        self.trainer, self.targets, self.train, self.device = trainer, targets, train, device
        self.epoch, self.steps = -1, iter(())
        self.switch_s: list[float] = []  # seconds of each epoch start (slab switch + next prefetch)

    def run_steps(self, n: int) -> float:
        """Seconds of this variant's next `n` steps, with no host sync between them; the epoch starts on
        the way are timed into `switch_s` and left out."""
        sync(self.device)
        start, switching, done = time.perf_counter(), 0.0, 0
        while done < n:
            try:
                next(self.steps)
                done += 1
            except StopIteration:
                switching += self._next_epoch()
        sync(self.device)
        return time.perf_counter() - start - switching

    def _next_epoch(self) -> float:
        self.epoch += 1
        v = self.train.num_views
        sync(self.device)  # the steps queued so far belong to the turn's time, not to the epoch start
        start = time.perf_counter()
        self.targets.start_epoch(EpochReads.whole(self.epoch % v, (self.epoch + 1) % v))
        sync(self.device)
        self.switch_s.append(time.perf_counter() - start)
        self.steps = epoch_steps(self.trainer, self.epoch, self.train, self.targets)
        return self.switch_s[-1]


def lockstep(lanes: dict[str, Lane], turns: int, chunk: int) -> dict[str, list[float]]:
    """`turns` turns of `chunk` steps of every lane, in rotating order: seconds per turn, per lane."""
    times: dict[str, list[float]] = {k: [] for k in lanes}
    names = list(lanes)
    for r in range(turns):
        for name in names[r % len(names):] + names[:r % len(names)]:  # none always goes first
            times[name].append(lanes[name].run_steps(chunk))
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.distill_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file whose student, teachers, distill and "
                        "cache sections are measured [params.yaml]")
    parser.add_argument("--method", default="meal", help="the distillation method of (b) and (c) [meal]")
    parser.add_argument("--teacher", action="append", default=[], help="only these teachers (repeatable)")
    parser.add_argument("--teachers", type=int, default=0, help="only the first N teachers (0 = all)")
    parser.add_argument("--samples", type=int, default=2048, help="synthetic training images (one epoch)")
    parser.add_argument("--views", type=int, default=2, help="cached views per image")
    parser.add_argument("--batch-size", type=int, default=0, help="override distill.batch_size (0 = params)")
    parser.add_argument("--rounds", type=int, default=336, help="timed steps per variant, in lock-step")
    parser.add_argument("--chunk", type=int, default=0, help="steps per lane per turn, host-synced only around a turn "
                        "(0 = 1 on the CPU, 8 on CUDA, where a sync per step would stall the queue of launches)")
    parser.add_argument("--warmup", type=int, default=48, help="untimed steps per variant first (allocator, kernels, "
                        "compile; a fresh process's first steps fault in fresh memory)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the student, or not (--no-compile) [the params' distill.compile]")
    parser.add_argument("--breakdown", action="store_true", help="also time the cached method without its discriminators "
                        "(and MEAL on the logits alone), interleaved with the rest: where its extra time goes")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=None, help="results JSON [bench/results/<device>-distill_throughput.json]")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.samples < 1 or args.views < 1 or args.warmup < 0 or args.chunk < 0:
        parser.error("--rounds, --samples and --views must each be at least 1, --warmup and --chunk at least 0")

    device = resolve_device(args.device)
    setup_cpu()  # the stages' CPU settings, so the bench times what they run
    params = load_params(args.params)
    work = Path(tempfile.mkdtemp(prefix="distill_throughput-"))
    try:
        print(f"setup: {args.params} on {device}", flush=True)
        s = setup(args, params, work, device)
        runs, train = s["runs"], s["train"]
        lanes = {k: Lane(trainer, targets, train, device) for k, (trainer, targets) in runs.items()}
        chunk = args.chunk or (8 if device.type == "cuda" else 1)
        turns = -(-args.rounds // chunk)  # whole turns: at least --rounds steps each
        lockstep(lanes, -(-args.warmup // chunk), chunk)
        for lane in lanes.values():
            lane.switch_s.clear()
        print(f"  timing {turns * chunk} steps of each of {len(lanes)} variants in lock-step, {chunk} at a time",
              flush=True)
        times = lockstep(lanes, turns, chunk)
        switch = {k: lane.switch_s for k, lane in lanes.items()}
        for _, targets in runs.values():
            targets.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    batch = runs["a_scratch"][0].cfg.batch_size
    ips = {k: batch * chunk / statistics.median(v) for k, v in times.items()}
    # ratios over blocks of turns that cover about one epoch's steps (the lanes ran side by side): every
    # variant against scratch (b/a is (b)'s), and (c) against (b); median over blocks
    per = max(1, steps_per_epoch(len(train), runs["a_scratch"][0].cfg) // chunk)  # turns per block
    whole = turns // per * per or turns  # whole blocks only (one short block if that is all)
    sums = {k: [sum(v[i:i + per]) for i in range(0, whole, per)] for k, v in times.items()}
    per_block = {k: [a / x for a, x in zip(sums["a_scratch"], v)] for k, v in sums.items()}
    vs_scratch = {k: statistics.median(v) for k, v in per_block.items()}
    b_over_a = vs_scratch["b_cached"]
    q1, q3 = quartiles(per_block["b_cached"])
    c_over_b = statistics.median(b / c for b, c in zip(sums["b_cached"], sums["c_online"]))
    channels, size, classes = s["shape"]
    print()
    print(f"student {s['student'].arch} {s['student'].model} ({s['student_params']:,} parameters), "
          f"{channels}x{size}x{size}, batch {runs['a_scratch'][0].cfg.batch_size}, "
          f"{len(s['teachers'])} teachers: {', '.join(s['teachers'])}, method {args.method}, {device}")
    print(f"{'variant':<38}{'img/s':>10}{'vs scratch':>12}{'epoch start ms':>16}")
    labels = {"a_scratch": "(a) scratch student", "b_cached": f"(b) {args.method} from the caches",
              "c_online": f"(c) {args.method} online (live teachers)",
              **{k: label for k, (label, _) in breakdown(args.method).items()}}
    for k in runs:
        start_ms = 1e3 * statistics.median(switch[k]) if switch[k] else float("nan")
        print(f"{labels[k]:<38}{ips[k]:>10.0f}{vs_scratch[k]:>12.3f}{start_ms:>16.1f}")
    print(f"b/a = {b_over_a:.3f} (interquartile {q1:.3f}-{q3:.3f})   c/b = {c_over_b:.3f}   (cached is "
          f"{1 / c_over_b:.2f}x faster than online; {turns * chunk} steps each in lock-step, medians over "
          f"{len(sums['a_scratch'])} blocks of {per * chunk} steps)")

    result = {
        **header("distill_throughput", device, argv, ("torch", "numpy", "zarr")),
        "params": args.params, "method": args.method, "student": {"arch": s["student"].arch, **s["student"].model},
        "student_params": s["student_params"], "teachers": s["teachers"], "input": [channels, size, size],
        "samples": args.samples, "views": args.views, "batch_size": batch, "rounds": args.rounds,
        "warmup": args.warmup, "chunk": chunk, "turn_times_s": times, "epoch_start_s": switch, "images_per_s": ips,
        "b_over_a": b_over_a, "b_over_a_interquartile": [q1, q3], "c_over_b": c_over_b, "cached_speedup_over_online": 1 / c_over_b,
        "vs_scratch": vs_scratch, "labels": {k: labels[k] for k in runs},
        "block_steps": per * chunk, "b_over_a_per_block": per_block["b_cached"],
    }
    write_result(result, "distill_throughput", args.out)
    return result


if __name__ == "__main__":
    run_main(main)
