"""Scale-out on paper: what a profile's caches weigh and what its all-reduces move, from counted parameters.

    python -m bench.scaleout --params profiles/gpu.yaml [--world 1 2 4 8 16]
    python -m bench.scaleout --params profiles/imagenet.yaml --images 1281167 --classes 1000

Nothing is trained or timed: the models of the profile are built (randomly initialised) to count their
parameters and BatchNorm channels, and the sizes follow from the cache contract and the ring all-reduce:

- a teacher's store holds, per (sample, view), C logits and L_b values per cached block, in fp16:
  bytes = N x V x (C + sum_b L_b) x 2 (raw, cache.codec none), or with cache.logits: topk 4k + 2 bytes in place
  of the 2C of the logits (pipeline.cache.plan); a rank reads 1/W of the epoch's view slab;
- DDP (and pipeline.dist.average_gradients for the discriminators) all-reduces every fp32 gradient once per
  step; a ring all-reduce sends, and receives, 2 (W - 1) / W x the buffer per rank;
- SyncBatchNorm all-reduces, per BatchNorm layer and step, the count, mean and variance forward (1 + 2 C
  floats) and the two gradient sums backward (2 C): 1 + 4 C floats per layer;
- the teacher targets a rank holds: under distill.shuffle: full the epoch's slab and the next one's (2 N / W
  rows); under shuffle: chunks at most the kept chunks of the last read (2 w + 1 whole chunks of R rows) and two
  parts of w R / W rows (pipeline.cache.slabs), whatever N;
- from files (data.source: files), an epoch decodes each image once: a GPU training at G images/s needs G
  decodes/s from its share of the cores, each doing 1000 / decode_ms; the epoch takes N / (W min(G, decodes/s)).
  G (--gpu-images-per-s) and decode_ms (--decode-ms) are inputs, with their sources printed.

Prints a table per world size and writes bench/results/paper-scaleout-<profile>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch.nn as nn

from pipeline.cache.plan import store_plan
from pipeline.config import build, load_params, section
from pipeline.data import DataConfig
from pipeline.methods.discriminators import Discriminators
from pipeline.methods import make_method
from pipeline.models import build_model, count_parameters
from pipeline.runs import run_names
from pipeline.runs import read_settings

# training images of each dataset (before data.val_size is carved out), and its classes and channels
DATASETS = {"cifar10": (50_000, 10, 3), "cifar100": (50_000, 100, 3), "svhn": (73_257, 10, 3),
            "fashion_mnist": (60_000, 10, 1)}
GB = 1e9
FILES_RESULT = Path("bench/results/cpu-files.json")  # its decode_and_view_224_ms: --decode-ms's default
# FKD's ResNet-50 with stored soft labels: 486.77 s per ImageNet epoch on 8 V100s (its paper, Table 9)
FKD_IMAGES_PER_S_PER_GPU = 1_281_167 / 486.77 / 8
CORES_PER_GPU = 16  # the lent H100 machine's cores (one GPU, 16 cores)


def bn_channels(model: nn.Module) -> tuple[int, int]:
    """(BatchNorm layers, their channels summed)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return len(bns), sum(m.num_features for m in bns)


def estimate(params_path: str, worlds: list[int], images: int = 0, classes_: int = 0, decode_ms: float = 0.0,
             gpu_images_per_s: float = FKD_IMAGES_PER_S_PER_GPU, cores_per_gpu: int = CORES_PER_GPU) -> dict:
    params = load_params(params_path)
    data = build(DataConfig, section(params, "data"), "data")
    if images and classes_:
        n_all, classes, channels = images, classes_, 3
    elif data.name in DATASETS:
        n_all, classes, channels = DATASETS[data.name]
    else:
        raise SystemExit(f"bench.scaleout knows the sizes of {', '.join(DATASETS)}, not {data.name}: "
                         f"give --images N --classes C")
    n = (data.limit or n_all) - data.val_size
    views = int(section(params, "views").get("num_views", 8))

    teachers = {}
    for name, spec in params["teachers"].items():
        model = build_model(spec["arch"], classes, channels, **spec.get("model", {}))
        teachers[name] = count_parameters(model)
    first = next(iter(params["distill"]["runs"]))
    s = read_settings(params, None, None, None, False, first)
    lengths = s.cache.align_config.lengths(3)  # the zoo's three blocks
    topk = s.cache.topk if s.cache.logits == "topk" else 0
    per_pair = store_plan("", Path("."), 1, 1, classes, {f"block{i + 1}": n for i, n in enumerate(lengths)},
                          topk).pair_bytes  # bytes per (sample, view) per teacher: full fp16 logits, or the top-k form
    store = n * views * per_pair

    student = build_model(s.student.arch, classes, channels, **s.student.model)
    p_student = count_parameters(student)
    bn_layers, bn_ch = bn_channels(student)
    runs = {}
    for run in run_names(section(params, "distill")):
        r = read_settings(params, None, None, None, False, run)
        method = make_method(r.method, r.options, r.teachers)
        dims = method.discriminators(classes, r.cache.align_config.lengths(len(method.block_names)))
        game = method.game
        p_disc = count_parameters(Discriminators(dims, game.discriminator, game.d_reduction)) if dims else 0
        runs[run] = {"method": r.method, "teachers": len(r.teachers), "discriminator_params": p_disc,
                     "batch_size": r.distill.batch_size, "epochs": r.distill.epochs}

    p_disc = max(info["discriminator_params"] for info in runs.values())  # the largest game's
    batch = s.distill.batch_size
    pre_batch = int(section(params, "pretrain").get("batch_size", 128))
    k_max = max(info["teachers"] for info in runs.values())
    chunk_rows = s.cache.chunk_rows
    window = s.distill.shuffle_window
    decodes_per_gpu = cores_per_gpu * 1000 / decode_ms if decode_ms else None
    rows = []
    for w in worlds:
        ring = 2 * (w - 1) / w  # of the buffer, sent (and received) by each rank
        steps = math.ceil(n / batch)
        grad_bytes = 4 * (p_student + p_disc)
        sync_bn_bytes = 4 * (bn_layers + 4 * bn_ch)
        rows.append({
            "world": w, "distill_steps_per_epoch": steps,
            "distill_allreduce_MB_per_step": ring * grad_bytes / 1e6,
            "distill_sync_bn_MB_per_step": ring * sync_bn_bytes / 1e6,
            "distill_allreduce_GB_per_epoch": ring * (grad_bytes + sync_bn_bytes) * steps / GB,
            "distill_slab_MB_per_epoch": max(info["teachers"] for info in runs.values()) * n * per_pair / w / 1e6,
            "pretrain_allreduce_MB_per_step": {t: ring * 4 * p / 1e6 for t, p in teachers.items()},
            "pretrain_steps_per_epoch": math.ceil(n / pre_batch),
            "targets_MB_held_full": k_max * per_pair * 2 * n / w / 1e6,
            "targets_MB_held_chunks": k_max * per_pair * min(n, (2 * window + 1) * chunk_rows
                                                           + 2 * window * chunk_rows / w) / 1e6,
        })
        if decodes_per_gpu:
            rate = min(gpu_images_per_s, decodes_per_gpu)
            rows[-1].update(decode_images_per_s_needed_per_gpu=gpu_images_per_s,
                            decode_images_per_s_per_gpu=decodes_per_gpu, epoch_s=n / (w * rate),
                            bound="decode" if decodes_per_gpu < gpu_images_per_s else "gpu")
    return {"profile": params_path, "num_samples": n, "num_views": views, "num_classes": classes,
            "source": data.source, "shuffle": s.distill.shuffle, "chunk_rows": chunk_rows, "shuffle_window": window,
            "decode_ms": decode_ms or None, "gpu_images_per_s": gpu_images_per_s, "cores_per_gpu": cores_per_gpu,
            "block_lengths": lengths, "bytes_per_pair_per_teacher": per_pair,
            "store_GB_per_teacher": store / GB, "stores_GB_total": store * len(teachers) / GB,
            "teacher_params": teachers, "student": s.student.arch, "student_params": p_student,
            "student_batchnorm": {"layers": bn_layers, "channels": bn_ch}, "runs": runs, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="profiles/gpu.yaml")
    ap.add_argument("--world", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--images", type=int, default=0, help="training images (an image folder's; else the dataset's)")
    ap.add_argument("--classes", type=int, default=0, help="classes (an image folder's)")
    ap.add_argument("--decode-ms", type=float, default=None,
                    help=f"ms per image per core to decode and cut a view [default: {FILES_RESULT}'s measure]")
    ap.add_argument("--gpu-images-per-s", type=float, default=FKD_IMAGES_PER_S_PER_GPU,
                    help="student training images/s per GPU [default: FKD's ResNet-50 on a V100, 329]")
    ap.add_argument("--cores-per-gpu", type=int, default=CORES_PER_GPU, help="decoding cores per GPU")
    ap.add_argument("--out", default=None, help="[default: bench/results/paper-scaleout-<profile>.json]")
    args = ap.parse_args(argv)
    decode_ms = args.decode_ms
    if decode_ms is None and FILES_RESULT.is_file():
        decode_ms = json.loads(FILES_RESULT.read_text()).get("decode", {}).get("decode_and_view_224_ms")
    est = estimate(args.params, args.world, args.images, args.classes, decode_ms or 0.0, args.gpu_images_per_s,
                   args.cores_per_gpu)
    print(f"{args.params}: N = {est['num_samples']:,} samples x V = {est['num_views']} views, C = "
          f"{est['num_classes']}, blocks L = {est['block_lengths']}: {est['bytes_per_pair_per_teacher']} bytes per "
          f"(sample, view) per teacher")
    for name, p in est["teacher_params"].items():
        print(f"  teacher {name:16s} {p:>12,} parameters")
    print(f"  store per teacher {est['store_GB_per_teacher']:.2f} GB, all {len(est['teacher_params'])} teachers "
          f"{est['stores_GB_total']:.2f} GB (raw fp16)")
    print(f"  student {est['student']} {est['student_params']:,} parameters, {est['student_batchnorm']['layers']} "
          f"BatchNorm layers ({est['student_batchnorm']['channels']:,} channels)")
    print("  discriminator parameters: " + ", ".join(f"{run} {info['discriminator_params']:,}"
                                                   for run, info in est["runs"].items()))
    big = max(est["teacher_params"], key=est["teacher_params"].get)
    print("per rank: each step's ring all-reduce (fp32 gradients: the student and the largest game's discriminators;")
    print("SyncBatchNorm's sums), and each epoch's gradient traffic and teacher slab rows read")
    print(f"{'W':>3} {'grad MB/step':>12} {'syncBN MB/step':>14} {'GB/epoch':>9} {'slab MB/epoch':>13} "
          f"{'pretrain ' + big + ' MB/step':>24}")
    for row in est["rows"]:
        print(f"{row['world']:>3} {row['distill_allreduce_MB_per_step']:>12.1f} "
              f"{row['distill_sync_bn_MB_per_step']:>14.3f} {row['distill_allreduce_GB_per_epoch']:>9.1f} "
              f"{row['distill_slab_MB_per_epoch']:>13.0f} {row['pretrain_allreduce_MB_per_step'][big]:>24.1f}")
    print(f"teacher targets held per rank: shuffle: full {est['rows'][0]['targets_MB_held_full']:,.0f} MB at W = "
          f"{est['rows'][0]['world']} (grows with N); shuffle: chunks (R = {est['chunk_rows']}, w = "
          f"{est['shuffle_window']}) {est['rows'][0]['targets_MB_held_chunks']:,.0f} MB (flat in N)")
    if est["rows"][0].get("epoch_s"):
        print(f"from files: {est['decode_ms']:.2f} ms per image per core (decode + one view), {est['cores_per_gpu']} "
              f"cores per GPU: {est['rows'][0]['decode_images_per_s_per_gpu']:,.0f} images/s per GPU against "
              f"{est['gpu_images_per_s']:,.0f} the GPU trains")
        print(f"{'W':>3} {'epoch min':>10} {'bound':>7} {'epochs/day':>11}")
        for row in est["rows"]:
            print(f"{row['world']:>3} {row['epoch_s'] / 60:>10.1f} {row['bound']:>7} {86400 / row['epoch_s']:>11.1f}")
    out = Path(args.out or Path("bench/results") / f"paper-scaleout-{Path(args.params).stem}.json")
    command = " ".join(["python -m bench.scaleout", *(argv if argv is not None else sys.argv[1:])])
    out.write_text(json.dumps({"command": command, **est}, indent=1))
    print(f"-> {out}")
    return est


if __name__ == "__main__":
    main()
