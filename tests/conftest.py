"""Shared fixtures: the real Fashion-MNIST folder, tiny IDX files, and a small split set."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path | None:
    for candidate in (os.environ.get("LENETLAB_DATA"), REPO.parent / "shared/data/fashion-mnist"):
        if candidate and (Path(candidate) / "train-images-idx3-ubyte.gz").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    found = real_data_dir()
    if found is None:
        pytest.skip("the real Fashion-MNIST is not here: set LENETLAB_DATA")
    return found


@pytest.fixture(scope="session")
def dataset(data_dir):
    from lenetlab.data import load_fashion_mnist

    return load_fashion_mnist(data_dir, download=False)


@pytest.fixture(scope="session")
def small_splits(dataset):
    """The real splits with 3,000 training images: a few seconds per epoch."""
    from lenetlab.data import make_splits

    return make_splits(dataset, split_seed=0, train_subset=3000)


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, compress: bool = True,
              cut: int = 0) -> Path:
    """Write an IDX file (gzip-compressed by default); cut drops that many bytes off the end."""
    magic = magic if magic is not None else (2051 if array.ndim == 3 else 2049)
    raw = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw += array.astype(np.uint8).tobytes()
    if cut:
        raw = raw[:-cut]
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.fixture
def tiny_dataset_dir(tmp_path) -> Path:
    """A structurally valid Fashion-MNIST folder of the full sizes (all-zero images)."""
    folder = tmp_path / "fmnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60_000), ("t10k", 10_000)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", np.zeros((n, 28, 28), np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return folder
