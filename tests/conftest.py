"""Shared fixtures: a tiny Fashion-MNIST in the real idx format, and a tiny params profile."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write `array` (uint8) as an idx file (gzip when the name ends in .gz), the format of (Fashion-)MNIST."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)


def synthetic_images(n: int, seed: int, size: int = 28, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Learnable tiny images: class k is a stripe texture (period 2 + k % 5, horizontal for k < 5,
    vertical otherwise) under noise, so translation-invariant networks with global pooling can learn it."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.uint8)
    grid = np.arange(size)
    images = rng.integers(0, 80, (n, size, size)).astype(np.uint8)
    for i, k in enumerate(labels):
        period = 2 + int(k) % 5
        on = (grid + rng.integers(0, period)) % period == 0  # (size,)
        mask = on[:, None] if k < 5 else on[None, :]
        images[i] = np.where(np.broadcast_to(mask, (size, size)), 220, images[i])
    return images, labels


@pytest.fixture(scope="session")
def fashion_root(tmp_path_factory) -> Path:
    """A directory holding a tiny Fashion-MNIST (512 train, 256 test) as the four idx .gz files."""
    root = tmp_path_factory.mktemp("fashion")
    for split, n, seed in (("train", 512, 0), ("t10k", 256, 1)):
        images, labels = synthetic_images(n, seed)
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture
def tiny_params(tmp_path, fashion_root, monkeypatch) -> Path:
    """tmp_path as the working directory with profiles/tiny.yaml pointed at the tiny dataset."""
    profile = yaml.safe_load((Path(__file__).parents[1] / "profiles" / "tiny.yaml").read_text())
    profile["data"]["root"] = str(fashion_root)
    profile["data"]["limit"] = 0
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    return path


@pytest.fixture
def full_disk(tmp_path) -> Path:
    """A directory on its own tiny file system under tmp_path, filled to the last byte (helpers.full_disk_at).
    Put things there first by deleting `.fill`, writing them and calling `helpers.fill_disk` again."""
    from helpers import full_disk_at

    with full_disk_at(tmp_path / "full_disk") as where:
        yield where


@pytest.fixture
def one_thread(monkeypatch):
    """One intra-op thread: on a loaded 2-core machine two spinning OpenMP threads make tiny steps up to 50x
    slower (stages call setup_cpu, which respects OMP_NUM_THREADS)."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
