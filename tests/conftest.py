"""Shared helpers: tiny IDX datasets written by the tests themselves."""

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray, magic_ndim: int | None = None) -> bytes:
    """Encode a uint8 array as an IDX file (magic 0x000008NN, big-endian dims)."""
    array = np.asarray(array, dtype=np.uint8)
    ndim = array.ndim if magic_ndim is None else magic_ndim
    header = struct.pack(">HBB", 0, 0x08, ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)
    return path


def synthetic_split(n: int, seed: int):
    """Images whose class is a bright bar at a class-specific position, plus noise,
    so that a model can learn something in a few steps."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.float64)
    for i, label in enumerate(labels):
        row = 2 + 2 * label
        images[i, row : row + 4, 4:24] = 200 + rng.integers(0, 55)
        images[i, 4:24, 12:16] += 60 * (label % 2)
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def write_dataset(folder: Path, n_train: int = 600, n_test: int = 200, gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    x_train, y_train = synthetic_split(n_train, 0)
    x_test, y_test = synthetic_split(n_test, 1)
    for key, array in (
        ("train_images", x_train),
        ("train_labels", y_train),
        ("test_images", x_test),
        ("test_labels", y_test),
    ):
        write_idx(folder / IDX_NAMES[key], array, gz=gz)
    return folder


def saved_weights(path) -> dict:
    """Every array of a Keras .weights.h5 file, by its path inside the file."""
    import h5py

    arrays = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if hasattr(item, "shape") else None)
    return arrays


def start_run(env: dict, code: str | None = None, **popen) -> subprocess.Popen:
    """vae_fashion.py as a script (or `code` in `python -c`) with only the given VAE_* variables set,
    its output merged and unbuffered."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VAE_")}
    full_env.update(env, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-u", str(ROOT / "vae_fashion.py")] if code is None else [sys.executable, "-c", code]
    return subprocess.Popen(command, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


@pytest.fixture
def dataset_dir(tmp_path):
    return write_dataset(tmp_path / "data")
