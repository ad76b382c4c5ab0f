"""The storage plan: what each teacher's store will weigh, before anything is written, and whether it fits.

    store_plan(teacher, path, N, V, C, lengths)   bytes per array per (sample, view), per pair and in all
    free_bytes(path)                              the free space where `path` goes (its nearest existing folder)
    check_room(path, need, what)                  a one-line refusal when `need` bytes do not fit there

`python -m stages.cache_teachers --plan` prints the plan of every teacher of the params; `cache_teacher` checks
the room for the chunks it has still to write before it creates or resumes a store. The sizes are the raw fp16
arrays (the default codec is none, and fp16 teacher outputs barely compress); the `done` markers and the
metadata add a few bytes per chunk, left out.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.cache.store import Layout
from pipeline.config import UserError


@dataclass
class StorePlan:
    teacher: str
    path: Path
    num_samples: int  # N
    num_views: int  # V
    arrays: dict[str, int]  # array name -> bytes per (sample, view): logits C x 2, each block L x 2

    @property
    def pair_bytes(self) -> int:
        return sum(self.arrays.values())

    @property
    def total_bytes(self) -> int:
        return self.num_samples * self.num_views * self.pair_bytes


def store_plan(teacher: str, path: Path, num_samples: int, num_views: int, num_classes: int,
               lengths: dict[str, int], topk: int = 0) -> StorePlan:
    """The plan of one store: `lengths` block name -> L, the aligned length of its vector; `topk` k of a
    `cache.logits: topk` store (0: full logits). The arrays are `Layout.widths`'s, at their dtypes' sizes."""
    layout = Layout(num_samples, num_views, num_classes, tuple(lengths), tuple(lengths.values()), 1, "none",
                    topk=topk)
    arrays = {name: width * layout.dtype(name).itemsize for name, width in layout.widths().items()}
    return StorePlan(teacher, Path(path), num_samples, num_views, arrays)


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem `path` will be written to (its nearest existing parent folder)."""
    where = Path(path).absolute()
    while not where.exists():
        where = where.parent
    return shutil.disk_usage(where).free


def check_room(path: Path, need: int, what: str) -> None:
    """A one-line UserError unless `need` bytes fit on the filesystem of `path`."""
    free = free_bytes(path)
    if need > free:
        raise UserError(f"{what} needs {human(need)} at {path} but its filesystem has {human(free)} free: free space "
                        f"there and rerun, or point the cache elsewhere (python -m stages.cache_teachers --plan shows "
                        f"every store's size)")


def human(n: float) -> str:
    """Bytes as B, KB, MB, GB or TB (powers of 1000, as disks are sold)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def plan_lines(plans: list[StorePlan], free: int) -> list[str]:
    """The printed plan: one line per array of each store, its totals, the zoo's, and the free space."""
    lines = []
    for p in plans:
        lines.append(f"{p.teacher}: {p.path}, {p.num_samples:,} samples x {p.num_views} views, "
                     f"{p.pair_bytes:,} bytes per (sample, view), {human(p.total_bytes)}")
        for name, size in p.arrays.items():
            lines.append(f"  {name:24s} {size:>8,} bytes per (sample, view)  "
                         f"{human(p.num_samples * p.num_views * size):>10}")
    total = sum(p.total_bytes for p in plans)
    fits = "fits" if total <= free else "does NOT fit"
    lines.append(f"all {len(plans)} store(s): {human(total)}; free where they go: {human(free)} ({fits})")
    return lines
