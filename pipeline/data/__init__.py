"""Datasets as whole uint8 tensors: Fashion-MNIST, CIFAR-10/100, SVHN and ImageFolder trees.

Every stage sees a split as one `ImageData`: all images (N, C, H, W) uint8 plus int64 labels, small
enough to hold in memory (or on the accelerator, docs/design.md section 5). Augmentation is not done here:
views are planned and replayed by `pipeline.augment`. Normalisation constants travel with the data.

- `fashion_mnist` (the default) is read straight from its idx files with numpy: from `data.root`,
  else Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist), else a torchvision
  download into ~/.cache/meal-distill where the internet is reachable.
- `cifar10`, `cifar100`, `svhn` go through torchvision's dataset classes, whose md5 checks are
  replaced by a presence check plus a check of what the files hold, so any file in the real format
  loads (the tests write tiny ones).
- `imagefolder`: `root/train/<class>/*.png|jpg...` and `root/test/` (or `root/val/`), resized to
  `image_size` on load.

The validation split is carved out of train by a permutation seeded with `split_seed`; loaded
datasets are cached in-process, so repeated `load_split` calls cost a copy, not a reload.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import pickle
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch

from pipeline.config import UserError, check, check_choice

SPLITS = ("train", "val", "test")

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_FILES = {  # (split, kind) -> idx file name without .gz
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}

# per-channel normalisation constants in [0, 1] units, fixed per dataset (not recomputed per split)
MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
}


@dataclass(frozen=True)
class DataShape:
    """What a model's constructor reads of a dataset (pipeline.models.constructor_kwargs), known from the
    params before any image is read: its channels and normalisation; the class count is a stand-in."""

    num_classes: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def shape_of(cfg: "DataConfig", num_classes: int = 10) -> DataShape:
    mean, std = MEAN_STD[cfg.name]
    return DataShape(num_classes, len(mean), mean, std)


def cache_dir() -> Path:
    """Where datasets are downloaded when no root is given: $XDG_CACHE_HOME/meal-distill (~/.cache/...)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "meal-distill"


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # fashion_mnist | cifar10 | cifar100 | svhn | imagefolder
    root: str | None = None  # directory holding the dataset files; None = the dataset's default location
    val_size: int = 0  # images carved out of train as a validation split (0 = none)
    split_seed: int = 0  # seed of the train/val carve
    image_size: int = 32  # imagefolder: the side of the square views (pixels); memory source: resized to it on load
    limit: int = 0  # 0 = all; else keep the first `limit` images of each split (tiny profiles, tests)
    source: str = "memory"  # memory (the split as one uint8 tensor) | files (imagefolder: decoded per batch)
    bad_files: str = "error"  # files source: error (one line naming the file) | skip (leave unreadable ones out)
    workers: int = -1  # files source: DataLoader processes decoding images (0 = the main process, -1 = a core each
    # but one, which leaves the main process its core: the fastest cache pass on a 2-core CPU, bench.files)
    prefetch: int = 2  # files source: batches each worker decodes ahead

    def __post_init__(self) -> None:
        check_choice(self.name, DATASETS, "data.name")
        check(self.root is None or self.root.strip() != "", "data.root is empty: give a directory or leave it unset")
        check(self.val_size >= 0, f"data.val_size = {self.val_size} must be >= 0 images (0 = no validation split)")
        check(0 <= self.split_seed < 2**63, f"data.split_seed = {self.split_seed} must be in [0, 2^63)")
        check(1 <= self.image_size <= 4096, f"data.image_size = {self.image_size} must be between 1 and 4096 pixels")
        check(self.limit >= 0, f"data.limit = {self.limit} must be >= 0 images (0 = all)")
        check_choice(self.source, ("memory", "files"), "data.source")
        check_choice(self.bad_files, ("error", "skip"), "data.bad_files")
        check(self.source == "memory" or self.name == "imagefolder",
              f"data.source = files reads an image folder: set data.name = imagefolder (not {self.name})")
        check(-1 <= self.workers <= 256, f"data.workers = {self.workers} must be between 0 and 256 processes "
                                         f"(or -1: one per core but one)")
        check(1 <= self.prefetch <= 64, f"data.prefetch = {self.prefetch} must be between 1 and 64 batches")

    def identity(self) -> dict[str, Any]:
        """What the data a model sees depends on, for checkpoint identities: not how it is loaded (workers,
        prefetch); the keys added with the file source only when set, so earlier checkpoints stay valid."""
        values = {k: v for k, v in asdict(self).items() if k not in ("workers", "prefetch")}
        for key, default in (("source", "memory"), ("bad_files", "error")):
            if values[key] == default:
                del values[key]
        return values


@dataclass(repr=False)
class ImageData:
    """One split held whole in memory. Tensors may be shared with the in-process cache: do not modify in place."""

    source: ClassVar[str] = "memory"  # where the pixels are: here (FileData: "files")
    images: torch.Tensor  # (N, C, H, W) uint8, contiguous
    labels: torch.Tensor  # (N,) int64
    classes: list[str]
    name: str  # dataset name
    split: str  # train | val | test
    mean: tuple[float, ...]  # per-channel normalisation constants in [0, 1] units (fixed per dataset)
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W) uint8, got {tuple(self.images.shape)} {self.images.dtype}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be (N,) int64 with N = {self.images.shape[0]}, "
                             f"got {tuple(self.labels.shape)} {self.labels.dtype}")
        if not (len(self.mean) == len(self.std) == self.images.shape[1]):
            raise ValueError(f"mean/std need one value per channel ({self.images.shape[1]})")
        self.images = self.images.contiguous()
        self.labels = self.labels.contiguous()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[2])

    @property
    def view_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # (C, H, W) of what a model sees

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @cached_property
    def fingerprint(self) -> str:
        """sha256 hex of (name, split, shape, image bytes, label bytes): what caches record and compare."""
        h = hashlib.sha256()
        h.update(f"{self.name}\0{self.split}\0{tuple(self.images.shape)}\0".encode())
        h.update(_bytes(self.images))
        h.update(_bytes(self.labels))
        return h.hexdigest()

    def __repr__(self) -> str:
        return (f"ImageData(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"shape={tuple(self.images.shape[1:])}, classes={self.num_classes})")


def _bytes(t: torch.Tensor) -> memoryview:
    """The tensor's raw bytes without a copy (when already contiguous on the CPU)."""
    return memoryview(np.ascontiguousarray(t.detach().cpu().numpy()).reshape(-1).view(np.uint8))


# ---------------------------------------------------------------- splits


def scoring_split(cfg: DataConfig) -> str:
    """The split a training stage scores its model on: `val` when one is carved from train (tuning never sees
    the test split), else `test`."""
    return "val" if cfg.val_size > 0 else "test"


def load_split(cfg: DataConfig, split: str) -> "ImageData | FileData":
    """The `split` (train | val | test) of the dataset `cfg` describes.

    `val` is carved out of train by a permutation seeded with `cfg.split_seed`; when `val_size > 0` the
    train split excludes those images. Both keep the original order of their images. `limit` then keeps
    the first `limit` images of the split. With `data.source: files` the split is a `FileData`: the same
    images, labels and carve, as files decoded batch by batch (pipeline.data.files).
    """
    check_choice(split, SPLITS, "split")
    if cfg.source == "files":
        from pipeline.data.files import load_file_split

        return load_file_split(cfg, split, _carve)
    train, test = _load(cfg.name, _root_key(cfg.root), cfg.image_size if cfg.name == "imagefolder" else 0)
    if split == "test":
        base, index = test, None
    else:
        base, index = train, _carve(cfg, len(train), split)
    images, labels = base.images, base.labels
    if index is not None:
        images, labels = images[index], labels[index]
    if cfg.limit:
        images, labels = images[: cfg.limit], labels[: cfg.limit]
    return ImageData(images=images, labels=labels, classes=list(base.classes), name=cfg.name, split=split,
                     mean=base.mean, std=base.std)


def _carve(cfg: DataConfig, n: int, split: str) -> torch.Tensor | None:
    """The indices of `split` (train or val) among the n training images, in their original order; None: all."""
    if split == "val":
        check(cfg.val_size > 0, "the val split was asked for but data.val_size = 0: set data.val_size > 0")
    check(cfg.val_size < n, f"data.val_size = {cfg.val_size} leaves no training images: "
                            f"{cfg.name} has {n} training images; lower data.val_size")
    if cfg.val_size == 0:
        return None
    gen = torch.Generator().manual_seed(cfg.split_seed)
    in_val = torch.zeros(n, dtype=torch.bool)
    in_val[torch.randperm(n, generator=gen)[: cfg.val_size]] = True
    return torch.nonzero(in_val if split == "val" else ~in_val).squeeze(1)  # sorted: original order


def clear_cache() -> None:
    """Forget the datasets loaded in this process (after the files on disk changed)."""
    _load.cache_clear()


def _root_key(root: str | None) -> str | None:
    return None if root is None else str(Path(root).expanduser().absolute())


@functools.lru_cache(maxsize=4)
def _load(name: str, root: str | None, image_size: int) -> tuple[ImageData, ImageData]:
    root_path = None if root is None else Path(root)
    if root_path is not None and not root_path.is_dir():
        raise UserError(f"data.root {root_path} does not exist or is not a directory: "
                        f"fix the path, or create it to download {name} there")
    return DATASETS[name](root_path, image_size)


def _data(images: np.ndarray | torch.Tensor, labels: Any, classes: list[str], name: str, split: str) -> ImageData:
    mean, std = MEAN_STD[name]
    return ImageData(images=torch.as_tensor(images, dtype=torch.uint8).contiguous(),
                     labels=torch.as_tensor(np.asarray(labels), dtype=torch.int64).contiguous(),
                     classes=list(classes), name=name, split=split, mean=mean, std=std)


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{where} has labels outside 0..{num_classes - 1} "
                        f"(found {int(labels.min())}..{int(labels.max())}): the files are not what they claim")


def _fetch(make: Callable[[], Any]) -> Any:
    """Run a torchvision constructor with download=True (the only network access; tests replace it)."""
    return make()


def _download(what: str, root: Path, make: Callable[[], Any], fix: str | None = None, where: str = "") -> None:
    """Download `what` into `root` through `make`, turning any failure into one UserError line.

    `where` names the places already searched (default: `root`), `fix` what the user can do instead.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
        _fetch(make)
    except Exception as exc:  # URLError, RuntimeError (md5, mirrors), OSError...
        reason = " ".join(str(exc).split()) or type(exc).__name__  # torchvision's messages span lines
        fix = fix or f"put the dataset files in {root} or point data.root at them"
        raise UserError(f"{what} not found in {where or root} and the download failed ({reason}): {fix}") from None


# ---------------------------------------------------------------- Fashion-MNIST (idx files)

_IDX_DTYPES = {0x08: np.uint8}  # the only element type Fashion-MNIST uses


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file (gzipped or not) as a numpy array; the magic number must say ubyte with `ndim` dims."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise UserError(f"cannot read {path} ({exc}): replace the file") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] != ndim:
        raise UserError(f"{path} is not an idx file of {ndim}-d unsigned bytes (magic {raw[:4].hex()}): "
                        f"replace it with the original Fashion-MNIST file")
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) != header + int(np.prod(shape)):
        raise UserError(f"{path} holds {len(raw) - header} bytes of data, its header says {shape}: "
                        f"the file is truncated or corrupt, replace it")
    return np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=header).reshape(shape)


def _idx_files(directory: Path) -> dict[tuple[str, str], Path] | None:
    """The 4 Fashion-MNIST idx files in `directory` (plain preferred over .gz), or None if any is missing."""
    found = {}
    for key, stem in FASHION_MNIST_FILES.items():
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _find_idx(directory: Path) -> dict[tuple[str, str], Path] | None:
    """The idx files directly in `directory` or in torchvision's layout `directory/FashionMNIST/raw`."""
    for d in (directory, directory / "FashionMNIST" / "raw"):
        files = _idx_files(d)
        if files:
            return files
    return None


def _load_fashion_mnist(root: Path | None, image_size: int = 0) -> tuple[ImageData, ImageData]:
    if root is not None:
        files = _find_idx(root) or _download_fashion_mnist(root)
    else:
        files = (_find_idx(DEBIAN_FASHION_MNIST) or _find_idx(cache_dir())
                 or _download_fashion_mnist(cache_dir(), where=f"{DEBIAN_FASHION_MNIST} or {cache_dir()}"))
    out = []
    for split in ("train", "test"):
        images = read_idx(files[(split, "images")], 3)
        labels = read_idx(files[(split, "labels")], 1)
        if images.shape[0] != labels.shape[0]:
            raise UserError(f"{files[(split, 'images')]} has {images.shape[0]} images but "
                            f"{files[(split, 'labels')]} has {labels.shape[0]} labels: the files do not match")
        _check_labels(labels, len(FASHION_MNIST_CLASSES), str(files[(split, "labels")]))
        out.append(_data(images[:, None].copy(), labels.astype(np.int64), FASHION_MNIST_CLASSES,
                         "fashion_mnist", split))
    return out[0], out[1]


def _download_fashion_mnist(root: Path, where: str = "") -> dict[tuple[str, str], Path]:
    from torchvision import datasets

    fix = ("`apt-get install dataset-fashion-mnist`, or set data.root to a folder holding the 4 idx files "
           "(train-images-idx3-ubyte.gz ...)")
    _download("Fashion-MNIST", root, lambda: datasets.FashionMNIST(str(root), train=False, download=True), fix, where)
    files = _find_idx(root)
    if files is None:
        raise UserError(f"Fashion-MNIST was downloaded into {root} but its idx files are not there: {fix}")
    return files


# ---------------------------------------------------------------- CIFAR-10 / CIFAR-100 (python pickles)


def _cifar_class(base: type) -> type:
    """torchvision's CIFAR class with the md5 checks replaced by a presence check.

    torchvision verifies each batch file against the md5 of the official release, so a re-packed or
    subset file (or a test's tiny one) is rejected as "not found or corrupted". We only require the
    files to be there and then check what they hold (shape, labels) ourselves.
    """

    class PresentFiles(base):  # type: ignore[misc, valid-type]
        def _check_integrity(self) -> bool:
            return all(os.path.isfile(os.path.join(self.root, self.base_folder, f))
                       for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            if not os.path.isfile(path):
                raise FileNotFoundError(path)
            with open(path, "rb") as infile:
                self.classes = list(pickle.load(infile, encoding="latin1")[self.meta["key"]])
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    PresentFiles.__name__ = base.__name__
    return PresentFiles


def _load_cifar(name: str, root: Path | None, image_size: int = 0) -> tuple[ImageData, ImageData]:
    from torchvision import datasets

    cls = _cifar_class(datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100)
    root = root if root is not None else cache_dir()
    folder = root / cls.base_folder
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    if not all((folder / f).is_file() for f in files):
        if any((folder / f).is_file() for f in files):  # a partial copy: do not download over it
            missing = [f for f in files if not (folder / f).is_file()]
            raise UserError(f"{folder} lacks {', '.join(missing)}: copy the complete "
                            f"{cls.base_folder} folder of {cls.filename} there")
        _download(name, root, lambda: cls(str(root), train=False, download=True),
                  f"extract {cls.filename} ({cls.url}) into {root}, or point data.root at the folder holding "
                  f"{cls.base_folder}/")
    out = []
    for split in ("train", "test"):
        try:
            ds = cls(str(root), train=split == "train", download=False)
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError, OSError, RuntimeError) as exc:
            raise UserError(f"{folder} does not hold valid CIFAR python batches ({type(exc).__name__}: {exc}): "
                            f"replace it with the folder from {cls.filename}") from None
        data = np.asarray(ds.data)
        labels = np.asarray(ds.targets, dtype=np.int64)
        if data.dtype != np.uint8 or data.shape[1:] != (32, 32, 3) or len(labels) != len(data):
            raise UserError(f"{folder} does not hold 32x32 RGB uint8 CIFAR batches "
                            f"(got {data.dtype} {data.shape}, {len(labels)} labels): replace the files")
        _check_labels(labels, len(ds.classes), str(folder))
        out.append(_data(np.ascontiguousarray(data.transpose(0, 3, 1, 2)), labels, ds.classes, name, split))
    return out[0], out[1]


# ---------------------------------------------------------------- SVHN (.mat files)


def _svhn_class() -> type:
    from torchvision import datasets

    class PresentFiles(datasets.SVHN):
        def _check_integrity(self) -> bool:  # presence only, see _cifar_class
            return os.path.isfile(os.path.join(self.root, self.filename))

    PresentFiles.__name__ = "SVHN"
    return PresentFiles


def _load_svhn(root: Path | None, image_size: int = 0) -> tuple[ImageData, ImageData]:
    try:
        import scipy.io  # noqa: F401  torchvision reads the .mat files with it
    except ImportError:
        raise UserError("SVHN's .mat files need scipy: `pip install scipy`") from None
    cls = _svhn_class()
    root = root if root is not None else cache_dir() / "svhn"
    out = []
    for split in ("train", "test"):
        filename = cls.split_list[split][1]
        if not (root / filename).is_file():
            _download(f"SVHN {filename}", root, lambda: cls(str(root), split=split, download=True),
                      f"put {cls.split_list[split][0]} in {root}, or point data.root at the folder holding it")
        try:
            ds = cls(str(root), split=split, download=False)
        except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError, TypeError) as exc:
            raise UserError(f"{root / filename} is not a valid SVHN .mat file ({type(exc).__name__}: {exc}): "
                            f"replace it with {cls.split_list[split][0]}") from None
        data = np.asarray(ds.data)
        labels = np.asarray(ds.labels, dtype=np.int64).reshape(-1)
        if data.dtype != np.uint8 or data.ndim != 4 or data.shape[1:] != (3, 32, 32) or len(labels) != len(data):
            raise UserError(f"{root / filename} does not hold 32x32 RGB uint8 images with one label each "
                            f"(got {data.dtype} {data.shape}, {len(labels)} labels): replace the file")
        _check_labels(labels, 10, str(root / filename))
        out.append(_data(np.ascontiguousarray(data), labels, [str(d) for d in range(10)], "svhn", split))
    return out[0], out[1]


# ---------------------------------------------------------------- ImageFolder trees


def _load_imagefolder(root: Path | None, image_size: int) -> tuple[ImageData, ImageData]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if root is None:
        raise UserError("data.name = imagefolder needs data.root: a directory with train/ and test/ (or val/) "
                        "subfolders holding one folder of images per class")
    train_dir = root / "train"
    test_dir = next((d for d in (root / "test", root / "val") if d.is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise UserError(f"data.root {root} must contain train/ and test/ (or val/) subfolders "
                        f"with one folder of images per class")
    classes = _class_folders(train_dir)
    test_classes = _class_folders(test_dir)
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise UserError(f"{train_dir} and {test_dir} have different class folders "
                        f"(only in train: {', '.join(only_train) or '-'}; only in {test_dir.name}: "
                        f"{', '.join(only_test) or '-'}): make them match")
    out = []
    for split, directory in (("train", train_dir), ("test", test_dir)):
        per_class = []
        for name in classes:
            files = sorted(p for p in (directory / name).rglob("*")
                           if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS))
            if not files:
                raise UserError(f"{directory / name} holds no images ({', '.join(IMG_EXTENSIONS)}): "
                                f"add some or remove the class folder")
            per_class.append(files)
        paths, labels = round_robin(per_class)
        workers = max(1, min(8, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:  # PIL decodes and resizes without the GIL
            arrays = list(pool.map(functools.partial(_read_image, size=image_size), paths))
        images = np.stack(arrays).transpose(0, 3, 1, 2)  # (N, 3, S, S)
        out.append(_data(np.ascontiguousarray(images), np.array(labels), classes, "imagefolder", split))
    return out[0], out[1]


def round_robin(per_class: list[list]) -> tuple[list, list[int]]:
    """Each class's files (in name order) -> (files, labels) numbered round-robin over the classes: class 0's
    first file, class 1's first, ..., then every class's second. Any run of consecutive samples, a teacher-cache
    chunk above all, then holds many classes, which `distill.shuffle: chunks` relies on to mix batches."""
    keyed = sorted((rank, label, f) for label, files in enumerate(per_class) for rank, f in enumerate(files))
    return [f for _, _, f in keyed], [label for _, label, _ in keyed]


def _class_folders(directory: Path) -> list[str]:
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir())
    if not classes:
        raise UserError(f"{directory} has no class folders: put each class's images in {directory}/<class>/")
    return classes


def _read_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path} ({exc}): remove or replace it") from None


# ---------------------------------------------------------------- registry

# name -> loader(root or None, image_size) -> (train, test); image_size matters to imagefolder only
DATASETS: dict[str, Callable[[Path | None, int], tuple[ImageData, ImageData]]] = {
    "fashion_mnist": _load_fashion_mnist,
    "cifar10": functools.partial(_load_cifar, "cifar10"),
    "cifar100": functools.partial(_load_cifar, "cifar100"),
    "svhn": _load_svhn,
    "imagefolder": _load_imagefolder,
}


# ---------------------------------------------------------------- the seam: where a batch's pixels come from


def skipped_note(data) -> str | None:
    """The line a stage prints when files of its split were left out (data.bad_files: skip), else None."""
    skipped = getattr(data, "skipped", None)
    if not skipped:
        return None
    more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return (f"{data.split}: {len(skipped)} unreadable file(s) left out (data.bad_files: skip): "
            f"{', '.join(skipped[:3])}{more}")


def source_sizes(data) -> tuple[Any, Any]:
    """(height, width) the views of `data` are planned on: the tensor's (one for all), or each file's (N,) each."""
    if data.source == "files":
        return data.sizes[:, 0], data.sizes[:, 1]
    return int(data.images.shape[2]), int(data.images.shape[3])


def resident(data, device: torch.device) -> torch.Tensor | None:
    """The images a tensor source keeps on `device` for a whole pass (None for files, read batch by batch)."""
    return None if data.source == "files" else data.images.to(device)  # (N, C, H, W) uint8


def step_views(data, images: torch.Tensor | None, steps: list[torch.Tensor], params: torch.Tensor, aug,
               device: torch.device, mix=None) -> Iterator[torch.Tensor]:
    """uint8 (b, C, H, W) views on `device`, one batch per entry of `steps` (the rows (b,) of each step), rows
    viewed by `params` (N, P) (one view per sample) and, with `mix` (pipeline.mix.MixPlan of the view, fields
    (N, ...) numpy), mixed with their partners. A tensor source (`images` from `resident`) replays them on the
    device; files are decoded by worker processes, the next batches while this one trains."""
    if images is not None:
        from pipeline.mix import tensor_views

        pairs = mix.to(device) if mix is not None else None
        for idx in steps:
            yield tensor_views(images, idx, params[idx], aug, pairs.take(idx) if pairs is not None else None)
        return
    from pipeline.data.files import file_views

    rows = torch.cat(steps).cpu().numpy() if steps else np.zeros(0, dtype=np.int64)
    ends = np.cumsum([len(s) for s in steps])
    batches = [np.arange(e - len(s), e) for s, e in zip(steps, ends)]
    for x in file_views(data, rows, params.cpu().numpy()[rows][:, None], aug, batches, pin=device.type == "cuda",
                        mix=mix.take(rows[:, None]) if mix is not None else None):
        yield x.to(device, non_blocking=True)


def pair_views(data, plan, pairs: np.ndarray, device: torch.device, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 (b, C, H, W) views of the (sample, view) `pairs` (n, 2) of `plan`, `batch_size` at a time, made as the
    cache pass makes them (mixed where the plan mixes): what --recompute reruns the teacher on, what inspect shows."""
    params = plan.aug[pairs[:, 0], pairs[:, 1]]  # (n, P) each pair's view
    if data.source == "files":
        from pipeline.data.files import file_views

        batches = [np.arange(s, min(len(pairs), s + batch_size)) for s in range(0, len(pairs), batch_size)]
        mix = plan.mix.take(pairs[:, :1], pairs[:, 1:]) if plan.mix is not None else None  # (n, 1, ...)
        for x in file_views(data, pairs[:, 0], params[:, None], plan.augment, batches, pin=device.type == "cuda",
                            mix=mix):
            yield x.to(device)
        return
    from pipeline.mix import tensor_views

    images = data.images.to(device)
    for s in range(0, len(pairs), batch_size):
        at = pairs[s:s + batch_size]
        mix = plan.mix.take(at[:, 0], at[:, 1]).to(device) if plan.mix is not None else None
        yield tensor_views(images, torch.from_numpy(at[:, 0]).to(device),
                           torch.from_numpy(params[s:s + batch_size]).to(device), plan.augment, mix)


def eval_views(data, device: torch.device, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 (b, C, H, W) un-augmented images on `device`, in order: a tensor source's images as they are, files
    resized and centre-cropped as torchvision's reference evaluation does."""
    if data.source != "files":
        for start in range(0, len(data), batch_size):
            yield data.images[start:start + batch_size].to(device)
        return
    from pipeline.augment import AugmentConfig
    from pipeline.data.files import centre_boxes, file_views

    n = len(data)
    batches = [np.arange(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
    for x in file_views(data, np.arange(n), centre_boxes(data.sizes), AugmentConfig(kind="rrc_flip"), batches,
                        pin=device.type == "cuda"):
        yield x.to(device, non_blocking=True)
