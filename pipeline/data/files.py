"""Images read from their files at native resolution, decoded batch by batch in DataLoader worker processes.

The file source for data too large to hold as one tensor (ImageNet's training split is about 193 GB as a
224-px uint8 tensor). A split is a list of files and labels, not pixels:

- an ImageFolder tree, `root/<split>/<class>/**/*.jpg` (classes are the training split's folder names), or
- a list file `root/<split>.txt` of `relative/path label` lines, as ImageNet's validation split is often
  shipped (a path is read relative to `root`, else to `root/<split>/`).

Each image's height and width are read from its header (no decode) when the split is listed, so views are
planned on each image's own size; its pixels are decoded only when a batch needs them, by `views_of_image`'s
boxes cut from one decode (`pipeline.augment`). A file that cannot be read ends the stage in one line naming
it, or with `data.bad_files: skip`, a file whose header cannot be read is left out of the split (the same
files on every stage: the choice depends on the file alone) and counted.
"""

from __future__ import annotations

import functools
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import ClassVar, Iterator

import numpy as np
import torch

from pipeline.config import UserError
from pipeline.data import MEAN_STD, _class_folders, round_robin  # the package runs first: no cycle

HEADER_THREADS = 8  # threads reading image headers when a split is listed (I/O-bound: more than the cores)


def decoder_identity() -> str:
    """The decoder and its version: part of a view plan's identity (another decoder may give other pixels).
    PIL, not torchvision.io: the latter decodes JPEG a little faster (bench.files measures both) but its image
    decoding is deprecated since torchvision 0.29."""
    import PIL

    return f"PIL {PIL.__version__}"


@dataclass(repr=False)
class FileData:
    """One split as files: what `ImageData` is for pixels in memory, without the pixels."""

    source: ClassVar[str] = "files"
    root: Path  # the dataset folder; `files` are relative to it
    files: list[str]  # (N,) relative paths, in sample order
    labels: torch.Tensor  # (N,) int64
    sizes: np.ndarray  # (N, 2) int64: each image's (height, width) in pixels, from its header
    byte_sizes: np.ndarray  # (N,) int64: each file's length, part of the fingerprint
    classes: list[str]
    name: str
    split: str
    mean: tuple[float, ...]  # per-channel normalisation constants in [0, 1] units
    std: tuple[float, ...]
    image_size: int  # the side of the square views a model sees (pixels)
    skipped: list[str] = field(default_factory=list)  # files left out (data.bad_files: skip)
    tolerate_truncated: bool = False  # data.bad_files: skip: a file cut short is decoded as far as it goes
    workers: int = 1  # DataLoader worker processes decoding images (0 = in the main process)
    prefetch: int = 2  # batches each worker decodes ahead

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return 3  # every image is decoded as RGB, grey ones included

    @property
    def view_shape(self) -> tuple[int, int, int]:
        return 3, self.image_size, self.image_size  # (C, H, W) of what a model sees

    def __len__(self) -> int:
        return len(self.files)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 hex of (name, split, then each file's relative path, length and label): what caches record. The
        pixels are not read (that would be a pass over the whole dataset): a file rewritten at the same length
        keeps the fingerprint."""
        h = hashlib.sha256(f"{self.name}\0{self.split}\0files\0{len(self)}\0".encode())
        for path, length, label in zip(self.files, self.byte_sizes.tolist(), self.labels.tolist()):
            h.update(f"{path}\0{length}\0{label}\n".encode())
        return h.hexdigest()

    def path(self, i: int) -> Path:
        return self.root / self.files[i]

    def __repr__(self) -> str:
        return (f"FileData(name={self.name!r}, split={self.split!r}, n={len(self)}, root={str(self.root)!r}, "
                f"classes={self.num_classes}, view size={self.image_size})")


# ---------------------------------------------------------------- listing a split


def list_split(root: Path, split: str, classes: list[str], extensions: tuple[str, ...]) -> tuple[list[str], list[int]]:
    """(relative paths, labels) of `split`: its class folders, else its list file `root/<split>.txt`."""
    folder, listing = root / split, root / f"{split}.txt"
    if listing.is_file():
        return _read_list(root, split, listing, len(classes))
    if not folder.is_dir():
        raise UserError(f"{root} has neither {split}/ (one folder per class) nor {split}.txt ('path label' lines): "
                        f"add one, or point data.root at the dataset folder")
    found = _class_folders(folder)
    if found != classes:
        extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        raise UserError(f"{folder} has other class folders than the training split (only here: "
                        f"{', '.join(extra) or '-'}; missing here: {', '.join(missing) or '-'}): make them match")
    per_class = []
    for name in classes:
        mine = sorted(_image_files(folder / name, extensions))
        if not mine:
            raise UserError(f"{folder / name} holds no images ({', '.join(extensions)}): add some or remove the "
                            f"class folder from every split")
        per_class.append([(folder / name / f).relative_to(root).as_posix() for f in mine])
    return round_robin(per_class)


def _image_files(folder: Path, extensions: tuple[str, ...]) -> Iterator[str]:
    """Paths under `folder` (relative to it, any depth) whose names end in an image extension."""
    for dirpath, _, names in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        for name in names:
            if name.lower().endswith(extensions):
                yield name if rel == "." else f"{rel}/{name}"


def _read_list(root: Path, split: str, listing: Path, num_classes: int) -> tuple[list[str], list[int]]:
    files, labels = [], []
    for number, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise UserError(f"{listing} line {number} is not 'path label': {line.strip()[:80]!r}")
        path, label = parts[0].strip(), int(parts[1])
        if not 0 <= label < num_classes:
            raise UserError(f"{listing} line {number}: label {label} is outside 0..{num_classes - 1} (the training "
                            f"split's {num_classes} class folders, sorted by name)")
        rel = next((p for p in (path, f"{split}/{path}") if (root / p).is_file()), None)
        if rel is None:
            raise UserError(f"{listing} line {number}: {path} is neither in {root} nor in {root / split}")
        files.append(rel)
        labels.append(label)
    if not files:
        raise UserError(f"{listing} lists no images: add 'path label' lines")
    return files, labels


# ---------------------------------------------------------------- headers and pixels


def header_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header; the pixels are not decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"cannot read image {path} ({_why(exc, path)}): remove or replace it, or set "
                        f"data.bad_files: skip") from None
    if not (0 < height <= 32767 and 0 < width <= 32767):  # the view plan stores boxes as int16
        raise UserError(f"image {path} is {width} x {height} pixels: at most 32767 a side")
    return height, width


def decode(path: Path, tolerate_truncated: bool = False) -> torch.Tensor:
    """The image's pixels as (3, H, W) uint8 (a channels-last view: the crop reads it once, so no copy is made
    here), grey and palette images converted to RGB. `tolerate_truncated`: a file cut short is decoded as far as
    it goes (PIL's LOAD_TRUNCATED_IMAGES), the rest grey."""
    from PIL import Image, ImageFile, UnidentifiedImageError

    saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, tolerate_truncated  # PIL's global
    try:
        with Image.open(path) as img:
            rgb = np.array(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"cannot decode image {path} ({_why(exc, path)}): remove or replace it, or set "
                        f"data.bad_files: skip to decode a cut-short file as far as it goes") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved  # as the caller had it: other readers in this process decide theirs
    return torch.from_numpy(rgb).permute(2, 0, 1)  # (3, H, W)


def _why(exc: BaseException, path: Path) -> str:
    said = " ".join(str(exc).replace(f"'{path}'", "").replace(str(path), "").split()).strip(" :")
    return f"{type(exc).__name__}: {said}" if said else type(exc).__name__


def read_headers(root: Path, files: list[str], skip_bad: bool, threads: int) -> tuple[np.ndarray, list[int]]:
    """(N, 2) sizes of the readable files and the indices of those left out (only when `skip_bad`)."""

    def one(rel: str) -> tuple[int, int] | str:
        try:
            return header_size(root / rel)
        except UserError as exc:
            if not skip_bad:
                raise
            return exc.message

    with ThreadPoolExecutor(max(1, threads)) as pool:  # opening a file is I/O: threads overlap the waits
        found = list(pool.map(one, files, chunksize=256))
    bad = [i for i, size in enumerate(found) if isinstance(size, str)]
    sizes = np.array([s for s in found if not isinstance(s, str)], dtype=np.int64).reshape(-1, 2)
    return sizes, bad


# ---------------------------------------------------------------- splits


def load_file_split(cfg, split: str, carve) -> FileData:
    """The `split` of the image folder `cfg.root` as files (see `pipeline.data.load_split`, whose carve of the
    validation split out of train, `carve`, applies here unchanged)."""
    if cfg.root is None:
        raise UserError("data.source = files needs data.root: a folder with train/<class>/ and test/ (or val/, or "
                        "test.txt / val.txt of 'path label' lines)")
    root = Path(cfg.root).expanduser().absolute()
    if not root.is_dir():
        raise UserError(f"data.root {root} does not exist or is not a directory: fix the path")
    if not (root / "train").is_dir():
        raise UserError(f"data.root {root} has no train/ folder: it must hold train/<class>/ folders of images")
    where = "train" if split != "test" else next(
        (s for s in ("test", "val") if (root / s).is_dir() or (root / f"{s}.txt").is_file()), "test")
    files, labels, sizes, lengths, skipped, classes = _listed(str(root), where, cfg.bad_files == "skip")
    index = np.arange(len(files)) if split == "test" else _as_index(carve(cfg, len(files), split), len(files))
    if cfg.limit:
        index = index[: cfg.limit]
    mean, std = MEAN_STD[cfg.name]
    return FileData(root=root, files=[files[i] for i in index], labels=torch.as_tensor(labels[index]),
                    sizes=sizes[index], byte_sizes=lengths[index], classes=classes, name=cfg.name, split=split,
                    mean=mean, std=std, image_size=cfg.image_size, skipped=skipped,
                    tolerate_truncated=cfg.bad_files == "skip", prefetch=cfg.prefetch,
                    workers=cfg.workers if cfg.workers >= 0 else max(1, (os.cpu_count() or 2) - 1))


def _as_index(index: torch.Tensor | None, n: int) -> np.ndarray:
    return np.arange(n) if index is None else index.numpy()


@functools.lru_cache(maxsize=8)
def _listed(root: str, where: str, skip_bad: bool):
    """The files, labels, header sizes and lengths of one folder split, read once per process."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    base = Path(root)
    classes = _class_folders(base / "train")
    files, labels = list_split(base, where, classes, IMG_EXTENSIONS)
    sizes, bad = read_headers(base, files, skip_bad, HEADER_THREADS)
    if bad:
        skipped = [files[i] for i in bad]
        keep = np.setdiff1d(np.arange(len(files)), bad)
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    else:
        skipped = []
    lengths = np.array([(base / f).stat().st_size for f in files], dtype=np.int64)
    return files, np.asarray(labels, dtype=np.int64), sizes, lengths, skipped, classes


def clear_listings() -> None:
    """Forget the listings read in this process (after files on disk changed)."""
    _listed.cache_clear()


# ---------------------------------------------------------------- views, batch by batch


def centre_boxes(sizes: np.ndarray, crop_fraction: float = 0.875) -> np.ndarray:
    """(N, 1, 5) view params of the evaluation crop: resize the shorter side to S / crop_fraction, then take the
    centre S x S (torchvision's reference evaluation), written as the box it cuts from the original image."""
    h, w = sizes[:, 0], sizes[:, 1]
    side = np.maximum(1, np.round(np.minimum(h, w) * crop_fraction)).astype(np.int64)
    box = np.stack([(h - side) // 2, (w - side) // 2, side, side, np.zeros_like(side)], axis=-1)
    return box[:, None].astype(np.int16)


class _Views(torch.utils.data.Dataset):
    """Item j: image rows[j] decoded once and its views params[j] (V, P) cut from it -> (V, 3, S, S) uint8; with
    `mix` (pipeline.mix.MixPlan, fields (M, V, ...)) each view mixed with its partner's, decoded here too."""

    def __init__(self, data: FileData, rows: np.ndarray, params: np.ndarray, aug, mix=None):
        self.root, self.files, self.size = data.root, data.files, data.image_size
        self.rows, self.params, self.aug, self.tolerate, self.mix = rows, params, aug, data.tolerate_truncated, mix

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, str]:
        from pipeline.augment import views_of_image

        try:
            views = views_of_image(self._decode(self.rows[j]), torch.from_numpy(self.params[j]), self.aug, self.size)
            if self.mix is not None:
                views = self._mixed(views, self.mix.take(j))
        except UserError as exc:  # reported by the main process in one line, not as a worker's traceback
            return torch.zeros(len(self.params[j]), 3, self.size, self.size, dtype=torch.uint8), exc.message
        return views, ""

    def _decode(self, row: int) -> torch.Tensor:
        return decode(self.root / self.files[int(row)], self.tolerate)  # (3, H, W)

    def _mixed(self, views: torch.Tensor, mix) -> torch.Tensor:
        """The V views (V, 3, S, S) mixed with their partners' views (`mix`: this item's (V, ...) fields)."""
        from pipeline.augment import views_of_image
        from pipeline.mix import mix_pixels

        others = views.clone()  # a plain view's "partner" is itself (lam 1: unchanged)
        for k in np.flatnonzero(mix.partner >= 0).tolist():
            others[k] = views_of_image(self._decode(mix.partner[k]), torch.from_numpy(mix.aug[k:k + 1]), self.aug,
                                       self.size)[0]
        return mix_pixels(views, others, mix.to(torch.device("cpu")))


def _collate(items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    views = torch.stack([v for v, _ in items])  # (r, V, 3, S, S)
    return views.flatten(0, 1), [e for _, e in items if e]  # (r * V, 3, S, S), sample-major


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # each worker is one core's decoder; more threads would fight the others


def file_views(data: FileData, rows: np.ndarray, params: np.ndarray, aug, batches: list[np.ndarray],
               pin: bool = False, mix=None) -> Iterator[torch.Tensor]:
    """uint8 (r * V, 3, S, S) views of the files `rows` (M,), params (M, V, P), one batch per entry of `batches`
    (positions into `rows`), in order; decoded by `data.workers` processes, `data.prefetch` batches ahead each,
    into pinned memory when `pin` (a CUDA device copies from it without a staging copy). `mix`: the pairs' mixing
    (pipeline.mix.MixPlan, fields (M, V, ...)), the partners decoded by the same worker."""
    from torch.utils.data import DataLoader

    workers = data.workers
    loader = DataLoader(_Views(data, rows, params, aug, mix), batch_sampler=[b.tolist() for b in batches],
                        num_workers=workers, prefetch_factor=data.prefetch if workers else None, pin_memory=pin,
                        collate_fn=_collate, worker_init_fn=_one_thread if workers else None)
    for views, errors in loader:
        if errors:
            raise UserError(errors[0])
        yield views
