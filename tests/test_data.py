"""pipeline.data on tiny files written in each dataset's real on-disk format, loaded through the real code."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import data
from pipeline.config import UserError, build
from pipeline.data import DATASETS, DataConfig, ImageData, load_split


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test touches the network: every torchvision download fails as it does on this machine."""
    calls = []

    def fetch(make):
        calls.append(make)
        raise URLError("offline in tests")

    monkeypatch.setattr(data, "_fetch", fetch)
    data.clear_cache()
    yield calls
    data.clear_cache()


def rng_images(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# ---------------------------------------------------------------- writers of the real formats


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def write_fashion(directory: Path, n_train: int = 30, n_test: int = 7, compress: bool = True, seed: int = 0):
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng_images(seed, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng_images(seed + 1, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }
    for name, array in arrays.items():
        write_idx(directory / name, array, compress)
    return arrays


def write_cifar10(root: Path, per_batch: int = 2, n_test: int = 3):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_images, train_labels = [], []
    for b in range(1, 6):
        images = rng_images(b, (per_batch, 3, 32, 32))
        labels = [(b + i) % 10 for i in range(per_batch)]
        entry = {"batch_label": f"training batch {b} of 5", "labels": labels,
                 "data": images.reshape(per_batch, 3072), "filenames": [f"img{i}.png" for i in range(per_batch)]}
        (folder / f"data_batch_{b}").write_bytes(pickle.dumps(entry, protocol=2))
        train_images.append(images)
        train_labels += labels
    test_images = rng_images(99, (n_test, 3, 32, 32))
    test_labels = [9 - i for i in range(n_test)]
    (folder / "test_batch").write_bytes(pickle.dumps(
        {"batch_label": "testing batch 1 of 1", "labels": test_labels, "data": test_images.reshape(n_test, 3072)},
        protocol=2))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps(
        {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, protocol=2))
    return np.concatenate(train_images), train_labels, test_images, test_labels, names


def write_cifar100(root: Path, n_train: int = 6, n_test: int = 4):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train, test = rng_images(5, (n_train, 3, 32, 32)), rng_images(6, (n_test, 3, 32, 32))
    train_labels, test_labels = [99, 0, 50, 7, 3, 98][:n_train], [1, 2, 97, 0][:n_test]
    for name, images, labels in (("train", train, train_labels), ("test", test, test_labels)):
        entry = {"filenames": [], "fine_labels": labels, "coarse_labels": [x // 5 for x in labels],
                 "data": images.reshape(len(images), 3072)}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    fine = [f"class{i:02d}" for i in range(100)]
    (folder / "meta").write_bytes(pickle.dumps(
        {"fine_label_names": fine, "coarse_label_names": [f"super{i}" for i in range(20)]}, protocol=2))
    return train, train_labels, test, test_labels, fine


# ---------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("layout, compress", [("flat", True), ("flat", False), ("torchvision", False),
                                              ("torchvision", True)])
def test_fashion_mnist_idx_layouts(tmp_path, layout, compress):
    directory = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    arrays = write_fashion(directory, compress=compress)
    cfg = DataConfig(root=str(tmp_path))
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert train.images.shape == (30, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.images.is_contiguous() and train.labels.dtype == torch.int64
    assert np.array_equal(train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(train.labels.numpy(), arrays["train-labels-idx1-ubyte"])
    assert np.array_equal(test.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert (train.split, test.split, train.name) == ("train", "test", "fashion_mnist")
    assert train.num_classes == 10 and train.classes[0] == "T-shirt/top"
    assert (train.in_channels, train.image_size, len(train), len(test)) == (1, 28, 30, 7)
    assert train.mean == (0.2860,) and train.std == (0.3530,)


def test_fashion_mnist_bad_magic_and_truncation(tmp_path):
    write_fashion(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[3] = 1  # says 1-d
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="not an idx file"):
        load_split(DataConfig(root=str(tmp_path)), "train")
    raw[3] = 3
    path.write_bytes(bytes(raw[:-5]))
    with pytest.raises(UserError, match="truncated"):
        load_split(DataConfig(root=str(tmp_path)), "train")


def test_fashion_mnist_missing_files_in_root(tmp_path, offline):
    write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="Fashion-MNIST not found in .*data.root") as info:
        load_split(DataConfig(root=str(tmp_path)), "train")
    assert "\n" not in str(info.value.message)
    assert len(offline) == 1  # a download was tried (and failed offline)


def test_fashion_mnist_missing_everywhere(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist") as info:
        load_split(DataConfig(), "train")
    assert "no-debian" in info.value.message and "\n" not in info.value.message


def test_fashion_mnist_default_location(tmp_path, monkeypatch):
    """With no root, the Debian folder is used (here a fake one)."""
    write_fashion(tmp_path / "debian", n_train=11, n_test=4)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    assert len(load_split(DataConfig(), "train")) == 11


DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist():
    cfg = DataConfig()
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert abs(train.images.float().mean().item() / 255 - 0.2860) < 1e-3
    assert load_split(cfg, "train").fingerprint == train.fingerprint


# ---------------------------------------------------------------- CIFAR, SVHN


def test_cifar10_pickles(tmp_path):
    train_images, train_labels, test_images, test_labels, names = write_cifar10(tmp_path)
    cfg = DataConfig(name="cifar10", root=str(tmp_path))
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert train.images.shape == (10, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    assert np.array_equal(train.images.numpy(), train_images)
    assert np.array_equal(test.images.numpy(), test_images)
    assert train.labels.tolist() == train_labels and test.labels.tolist() == test_labels
    assert train.classes == names and train.mean == (0.4914, 0.4822, 0.4465)


def test_cifar100_pickles(tmp_path):
    train_images, train_labels, test_images, test_labels, fine = write_cifar100(tmp_path)
    cfg = DataConfig(name="cifar100", root=str(tmp_path))
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert np.array_equal(train.images.numpy(), train_images)
    assert np.array_equal(test.images.numpy(), test_images)
    assert train.labels.tolist() == train_labels and test.labels.tolist() == test_labels
    assert train.classes == fine and train.num_classes == 100


def test_cifar_partial_and_missing(tmp_path, offline):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UserError, match="lacks data_batch_3"):
        load_split(DataConfig(name="cifar10", root=str(tmp_path)), "train")
    assert not offline  # never downloads over a partial copy
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=f"cifar100 not found in {empty}.*offline in tests"):
        load_split(DataConfig(name="cifar100", root=str(empty)), "train")
    assert len(offline) == 1


def test_cifar_garbage_file(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="valid CIFAR python batches"):
        load_split(DataConfig(name="cifar10", root=str(tmp_path)), "train")


def test_svhn_mat(tmp_path):
    sio = pytest.importorskip("scipy.io")
    images = {"train": rng_images(7, (5, 3, 32, 32)), "test": rng_images(8, (3, 3, 32, 32))}
    digits = {"train": [10, 1, 2, 9, 10], "test": [3, 10, 5]}  # SVHN writes digit 0 as label 10
    for split in ("train", "test"):
        x = np.ascontiguousarray(images[split].transpose(2, 3, 1, 0))  # (H, W, C, N) as in the .mat files
        sio.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": np.array(digits[split], np.uint8)[:, None]})
    cfg = DataConfig(name="svhn", root=str(tmp_path))
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert np.array_equal(train.images.numpy(), images["train"])
    assert np.array_equal(test.images.numpy(), images["test"])
    assert train.labels.tolist() == [0, 1, 2, 9, 0] and test.labels.tolist() == [3, 0, 5]
    assert train.classes == [str(d) for d in range(10)]


# ---------------------------------------------------------------- ImageFolder


def write_png_tree(root: Path, splits=("train", "test"), classes=("cat", "dog"), per_class: int = 2) -> None:
    colour = {"cat": (200, 10, 30), "dog": (5, 250, 128), "emu": (1, 2, 3)}
    for split in splits:
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (8, 6), colour[name]).save(root / split / name / f"{i}.png")
    # a grayscale image and a non-image file in train/cat
    Image.new("L", (5, 5), 77).save(root / splits[0] / classes[0] / "gray.png")
    (root / splits[0] / classes[0] / "notes.txt").write_text("not an image")


def test_imagefolder(tmp_path):
    write_png_tree(tmp_path, splits=("train", "val"))
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=4)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert train.images.shape == (5, 3, 4, 4) and test.images.shape == (4, 3, 4, 4)
    assert train.classes == ["cat", "dog"] and train.labels.tolist() == [0, 1, 0, 1, 0]  # round-robin over classes
    assert train.images[0, :, 0, 0].tolist() == [200, 10, 30]  # solid colours survive the bilinear resize
    assert train.images[4].unique().tolist() == [77]  # gray.png, converted to RGB
    assert train.images[3, :, 3, 3].tolist() == [5, 250, 128]
    assert test.split == "test" and test.mean == (0.485, 0.456, 0.406)
    assert load_split(DataConfig(name="imagefolder", root=str(tmp_path), image_size=9), "test").image_size == 9


def test_imagefolder_errors(tmp_path):
    write_png_tree(tmp_path / "a")
    (tmp_path / "a" / "test" / "dog").rename(tmp_path / "a" / "test" / "emu")
    with pytest.raises(UserError, match="different class folders.*only in train: dog; only in test: emu"):
        load_split(DataConfig(name="imagefolder", root=str(tmp_path / "a")), "train")
    write_png_tree(tmp_path / "b", splits=("train",))
    with pytest.raises(UserError, match="must contain train/ and test/"):
        load_split(DataConfig(name="imagefolder", root=str(tmp_path / "b")), "train")
    write_png_tree(tmp_path / "c")
    (tmp_path / "c" / "test" / "dog" / "0.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read image"):
        load_split(DataConfig(name="imagefolder", root=str(tmp_path / "c")), "test")
    with pytest.raises(UserError, match="needs data.root"):
        load_split(DataConfig(name="imagefolder"), "train")


# ---------------------------------------------------------------- splits, limit, fingerprint


def test_val_carve(tmp_path):
    write_fashion(tmp_path, n_train=30)
    cfg = DataConfig(root=str(tmp_path), val_size=8, split_seed=3)
    full = load_split(DataConfig(root=str(tmp_path)), "train")
    train, val = load_split(cfg, "train"), load_split(cfg, "val")
    assert (len(train), len(val), val.split) == (22, 8, "val")
    # disjoint and covering: every training image lands in exactly one split (images are distinct)
    key = lambda d: [bytes(x.numpy()) for x in d.images]  # noqa: E731
    assert sorted(key(train) + key(val)) == sorted(key(full))
    assert not set(key(train)) & set(key(val))
    # deterministic, and in the original order
    again = load_split(cfg, "val")
    assert torch.equal(again.images, val.images) and torch.equal(again.labels, val.labels)
    positions = [key(full).index(k) for k in key(val)]
    assert positions == sorted(positions)
    other = load_split(DataConfig(root=str(tmp_path), val_size=8, split_seed=4), "val")
    assert not torch.equal(other.images, val.images)
    assert load_split(cfg, "test").images.shape[0] == 7  # test untouched


def test_limit(tmp_path):
    write_fashion(tmp_path, n_train=30)
    full = load_split(DataConfig(root=str(tmp_path), val_size=10), "train")
    cfg = DataConfig(root=str(tmp_path), val_size=10, limit=4)
    train, val, test = (load_split(cfg, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (4, 4, 4)
    assert torch.equal(train.images, full.images[:4])  # limit applies after the carve
    assert len(load_split(DataConfig(root=str(tmp_path), limit=1000), "train")) == 30


def test_fingerprint(tmp_path):
    arrays = write_fashion(tmp_path / "a")
    cfg = DataConfig(root=str(tmp_path / "a"))
    first = load_split(cfg, "train").fingerprint
    data.clear_cache()
    assert load_split(cfg, "train").fingerprint == first  # stable across loads
    assert load_split(cfg, "test").fingerprint != first
    assert len(first) == 64 and int(first, 16) >= 0
    images = arrays["train-images-idx3-ubyte"].copy()
    images[17, 3, 5] ^= 1  # one pixel
    write_fashion(tmp_path / "b")
    write_idx(tmp_path / "b" / "train-images-idx3-ubyte", images, compress=True)
    assert load_split(DataConfig(root=str(tmp_path / "b")), "train").fingerprint != first
    assert load_split(DataConfig(root=str(tmp_path / "b")), "test").fingerprint == load_split(cfg, "test").fingerprint


def test_in_process_cache(tmp_path, monkeypatch):
    write_fashion(tmp_path)
    cfg = DataConfig(root=str(tmp_path))
    load_split(cfg, "train")
    monkeypatch.setattr(data, "read_idx", lambda *a: pytest.fail("reloaded from disk"))
    load_split(cfg, "test")
    load_split(DataConfig(root=str(tmp_path), val_size=3), "val")


# ---------------------------------------------------------------- config errors


def test_config_errors(tmp_path):
    with pytest.raises(UserError, match="data.name = 'mnist' is not one of"):
        DataConfig(name="mnist")
    with pytest.raises(UserError, match="val_size"):
        DataConfig(val_size=-1)
    with pytest.raises(UserError, match="limit"):
        DataConfig(limit=-2)
    with pytest.raises(UserError, match="image_size"):
        DataConfig(image_size=0)
    with pytest.raises(UserError, match="unknown key"):
        build(DataConfig, {"nmae": "cifar10"}, "data")
    assert build(DataConfig, {"name": "cifar10", "val_size": 5}, "data").val_size == 5
    missing = tmp_path / "nope"
    for name in DATASETS:
        with pytest.raises(UserError, match=f"data.root {missing} does not exist"):
            load_split(DataConfig(name=name, root=str(missing)), "train")
    assert not missing.exists()
    write_fashion(tmp_path / "f", n_train=5)
    with pytest.raises(UserError, match="leaves no training images"):
        load_split(DataConfig(root=str(tmp_path / "f"), val_size=5), "val")
    with pytest.raises(UserError, match="val_size = 0"):
        load_split(DataConfig(root=str(tmp_path / "f")), "val")
    with pytest.raises(UserError, match="split = 'dev'"):
        load_split(DataConfig(root=str(tmp_path / "f")), "dev")


def test_imagedata_checks():
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    d = ImageData(images, torch.tensor([0, 1]), ["a", "b"], "x", "train", (0.5,), (0.5,))
    assert "n=2" in repr(d)
    with pytest.raises(ValueError):
        ImageData(images.float(), torch.tensor([0, 1]), ["a", "b"], "x", "train", (0.5,), (0.5,))
    with pytest.raises(ValueError):
        ImageData(images, torch.tensor([0, 1, 1]), ["a", "b"], "x", "train", (0.5,), (0.5,))


def test_the_data_identity_of_a_checkpoint_ignores_how_files_are_loaded():
    """Checkpoints record `DataConfig.identity()`: the keys of the memory source alone (as checkpoints made before
    the file source recorded them, so they still resume), plus the file source's keys that change the pixels."""
    from pipeline.data import DataConfig

    before = {"name": "fashion_mnist", "root": None, "val_size": 0, "split_seed": 0, "image_size": 32, "limit": 0}
    assert DataConfig().identity() == before
    files = DataConfig(name="imagefolder", root="x", source="files")
    assert DataConfig(name="imagefolder", root="x", source="files", workers=7, prefetch=9).identity() == files.identity()
    assert files.identity()["source"] == "files" and "bad_files" not in files.identity()
    assert DataConfig(name="imagefolder", root="x", source="files", bad_files="skip").identity() != files.identity()
