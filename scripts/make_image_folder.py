"""A generated folder of JPEGs of varied sizes, for tests and benchmarks of data read from files.

    python scripts/make_image_folder.py --out datasets/generated --classes 10 --train-per-class 200 \
        --test-per-class 50 --min-side 160 --max-side 500

Writes `OUT/train/<class>/*.jpg` and `OUT/test/<class>/*.jpg` (an ImageFolder tree, as ImageNet's training split
is shipped) or, with `--test-layout list`, `OUT/test/*.jpg` plus `OUT/test.txt` of "relative/path label" lines (as
ImageNet's validation split is often shipped). Each image is a pure function of (--seed, split, class, index):
a class-dependent grating (orientation and frequency) and blob over noise, at a width and height each drawn from
[--min-side, --max-side], so a small network learns the classes from crops and aspect ratios vary as in photos.
`--grey-every K` makes every K-th image single-channel (as some ImageNet JPEGs are); `--bad` adds the broken inputs
a loader must refuse by name: a truncated JPEG, a text file named .jpg and an empty class folder (test only).
Images are written by a process pool; a rerun over an existing folder rewrites it the same, byte for byte.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def class_name(k: int) -> str:
    return f"c{k:04d}"


def image_of(seed: int, split: str, k: int, i: int, num_classes: int, min_side: int, max_side: int,
             grey: bool) -> np.ndarray:
    """(H, W, 3) or (H, W) uint8: class k's pattern on this image's own size, seeded by (seed, split, k, i)."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, k, i])
    h, w = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    angle = math.pi * k / num_classes + rng.normal(0, 0.05)  # the class's orientation, slightly jittered
    period = (0.08 + 0.12 * ((k * 7) % num_classes) / max(1, num_classes - 1)) * min(h, w)  # pixels per cycle
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * math.pi)
    grating = np.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period + phase)  # (H, W)
    cy, cx, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, rng.uniform(0.15, 0.3) * min(h, w)
    blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))  # where the pattern is strongest
    colour = 0.5 + 0.5 * np.array([math.cos(2 * math.pi * (k / num_classes + c / 3)) for c in range(3)])
    base = rng.uniform(0.2, 0.5, size=3)
    img = base + 0.45 * (grating * blob)[..., None] * colour + rng.normal(0, 0.06, size=(h, w, 3))  # (H, W, 3)
    img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return img.mean(axis=2).round().astype(np.uint8) if grey else img


def _write_one(job: tuple) -> None:
    from PIL import Image

    path, args = job[0], job[1:]
    Image.fromarray(image_of(*args)).save(path, format="JPEG", quality=90)


def jobs_for(out: Path, a: argparse.Namespace) -> tuple[list[tuple], list[str]]:
    """One job per image, and the test list's lines when the test split is a flat folder plus a list file."""
    jobs, lines, n = [], [], 0
    for split, per_class in (("train", a.train_per_class), ("test", a.test_per_class)):
        flat = split == "test" and a.test_layout == "list"  # labels in the list file, not in folder names
        for k in range(a.classes):
            folder = out / split if flat else out / split / class_name(k)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                path = folder / (f"{class_name(k)}_{i:05d}.jpg" if flat else f"{i:05d}.jpg")
                grey = a.grey_every > 0 and n % a.grey_every == a.grey_every - 1
                jobs.append((path, a.seed, split, k, i, a.classes, a.min_side, a.max_side, grey))
                if flat:
                    lines.append(f"{path.relative_to(out).as_posix()} {k}")
                n += 1
    return jobs, lines


def add_bad_files(out: Path) -> list[Path]:
    """The broken inputs of a real folder: a JPEG cut short, a text file named .jpg, an empty class folder."""
    first = out / "train" / class_name(0)
    good = sorted(first.glob("*.jpg"))[0].read_bytes()
    truncated, not_image = first / "zz_truncated.jpg", first / "zz_not_an_image.jpg"
    truncated.write_bytes(good[: len(good) // 3])
    not_image.write_text("this is not a JPEG\n")
    empty = out / "train" / "zz_empty_class"
    empty.mkdir(exist_ok=True)
    return [truncated, not_image, empty]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("datasets/generated"), help="folder to write")
    parser.add_argument("--classes", type=int, default=10, help="number of classes")
    parser.add_argument("--train-per-class", type=int, default=200, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=50, help="test images per class")
    parser.add_argument("--min-side", type=int, default=160, help="smallest image height or width (pixels)")
    parser.add_argument("--max-side", type=int, default=500, help="largest image height or width (pixels)")
    parser.add_argument("--grey-every", type=int, default=0, help="every K-th image single-channel (0 = none)")
    parser.add_argument("--test-layout", choices=("folders", "list"), default="folders",
                        help="test/<class>/*.jpg, or test/*.jpg with test.txt of 'path label' lines")
    parser.add_argument("--bad", action="store_true", help="add a truncated JPEG, a non-image and an empty class")
    parser.add_argument("--seed", type=int, default=0, help="seed of every image")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="writer processes")
    a = parser.parse_args()
    if not (1 <= a.classes <= 100_000 and a.train_per_class >= 1 and a.test_per_class >= 0):
        parser.error("--classes must be in [1, 100000], --train-per-class >= 1, --test-per-class >= 0")
    if not 8 <= a.min_side <= a.max_side <= 8192:
        parser.error(f"need 8 <= --min-side ({a.min_side}) <= --max-side ({a.max_side}) <= 8192")
    start = time.perf_counter()
    jobs, lines = jobs_for(a.out, a)
    with ProcessPoolExecutor(max(1, a.workers)) as pool:
        for _ in pool.map(_write_one, jobs, chunksize=64):
            pass
    if lines:
        (a.out / "test.txt").write_text("\n".join(lines) + "\n")
    bad = add_bad_files(a.out) if a.bad else []
    size = sum(p.stat().st_size for p in a.out.rglob("*.jpg"))
    print(f"{len(jobs):,} JPEGs ({size / 2**20:.1f} MiB) of {a.classes} classes in {a.out} "
          f"in {time.perf_counter() - start:.1f}s" + (f"; broken inputs: {', '.join(map(str, bad))}" if bad else ""))


if __name__ == "__main__":
    main()
