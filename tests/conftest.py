"""Shared helpers: tiny IDX datasets written by the tests themselves, and whole runs of the script:
one tiny-run environment, one way to run to the end, one way to kill at a line, one same-run comparison."""

import contextlib
import gzip
import io
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
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


def bars_data(n_train: int = 80, n_test: int = 40):
    """synthetic_split's images as the cell's FashionMNIST: float32 in [0, 1], int32 labels, no noisy copies."""
    import vae_fashion as vf

    x_train, y_train = synthetic_split(n_train, 0)
    x_test, y_test = synthetic_split(n_test, 1)
    return vf.FashionMNIST(vf.to_unit_float(x_train), y_train.astype(np.int32), vf.to_unit_float(x_test),
                           y_test.astype(np.int32), "bars")


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


# A run of the whole script that takes seconds: 4 epochs of 512 images at batch 64 (8 steps, the last
# partial), the analysis on 100 test images without the generation classifier, t-SNE and UMAP (UMAP's
# compilation alone takes ~10 s a process), tiny classical subsets.
TINY_RUN = {"VAE_EPOCHS": "4", "VAE_WARMUP_EPOCHS": "2", "VAE_BATCH_SIZE": "64", "VAE_TRAIN_SAMPLES": "512",
            "VAE_TEST_SAMPLES": "100", "VAE_EMBED_SAMPLES": "0", "VAE_CLASSICAL_SAMPLES": "20",
            "VAE_GEN_METRICS": "0", "VAE_SEED": "5"}


def finish_run(env: dict, code: str | None = None, **popen) -> str:
    """Run to the end (exit 0) and return the log."""
    process = start_run(env, code, **popen)
    log = process.communicate(timeout=900)[0]
    assert process.returncode == 0, log[-4000:]
    return log


def run_here(env: dict) -> str:
    """The same run as start_run's, in this process (no TensorFlow import to wait for): its printed log. A run
    in a process that has run others equals one in a fresh interpreter, bit for bit (test_resume compares them)."""
    import vae_fashion as vf

    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        vf.run(vf.config_from_env(env, {}), environ=env)
    return log.getvalue()


def kill_at(env: dict, line_start: str, code: str | None = None, **popen) -> str:
    """Start a run and SIGKILL it as soon as it prints a line starting with `line_start`; the log so far.
    The folder it leaves must never pass for a finished run."""
    victim = start_run(env, code, **popen)
    seen = []
    for line in victim.stdout:
        seen.append(line)
        if line.startswith(line_start):
            victim.send_signal(signal.SIGKILL)
            break
    victim.wait(timeout=60)
    log = "".join(seen)
    assert victim.returncode == -signal.SIGKILL, f"never printed {line_start!r}:\n" + log[-3000:]
    out = Path(env["VAE_OUT_DIR"])
    assert json.loads((out / "run_status.json").read_text())["status"] == "running"  # never 'finished'
    assert not (out / "metrics.csv").exists() and not (out / "metrics.txt").exists()
    return log


def assert_same_run(out: Path, reference: Path) -> None:
    """Exactly equal: every printed digit of metrics.csv and history.csv, every saved weight, the prior."""
    pd.testing.assert_frame_equal(pd.read_csv(out / "metrics.csv"), pd.read_csv(reference / "metrics.csv"))
    pd.testing.assert_frame_equal(pd.read_csv(out / "history.csv"), pd.read_csv(reference / "history.csv"))
    ours, theirs = (saved_weights(folder / "checkpoint" / "vae.weights.h5") for folder in (out, reference))
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    assert (out / "prior.npz").exists() == (reference / "prior.npz").exists()
    if (reference / "prior.npz").exists():
        ours, theirs = np.load(out / "prior.npz"), np.load(reference / "prior.npz")
        assert ours.files == theirs.files
        for name in theirs.files:
            np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    assert json.loads((out / "run_status.json").read_text())["status"] == "finished"


@pytest.fixture(autouse=True)
def keras_global_state():
    """Every test starts in float32 and leaves the process as it found it: run() and setup_devices() set
    Keras' global dtype policy, which would otherwise leak into the next test."""
    import keras

    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def dataset_dir(tmp_path):
    return write_dataset(tmp_path / "data")
