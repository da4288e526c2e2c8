"""Helpers shared by profile_step.py and profile_layers.py: a fixed training batch, the median time of
a call, and a layer's multiply-adds."""

import time

import keras
import numpy as np
import tensorflow as tf

import vae_fashion as vf


def fixed_batch(batch: int) -> dict:
    """One seeded batch in the form DistributedVAE.train_step takes."""
    clean = np.random.default_rng(0).random((batch, 28, 28, 1)).astype(np.float32) ** 3
    return {"noisy": tf.constant(vf.add_noise(clean, 0.45, 0)), "clean": tf.constant(clean),
            "label": tf.constant(np.arange(batch, dtype=np.int32) % 10), "step_key": tf.zeros(batch, tf.int64)}


def median_ms(fn, calls: int = 30, warmups: int = 5) -> float:
    """Median milliseconds per call, results fetched to the host (so asynchronous work is counted)."""
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, fn())
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def layer_macs(layer) -> int:
    """Multiply-adds of one forward pass per image: kernel size x output pixels (x input pixels for a
    transposed convolution, whose kernel is applied once per input pixel); 0 for a layer without a kernel."""
    if getattr(layer, "kernel", None) is None:
        return 0
    shape = layer.input.shape if isinstance(layer, keras.layers.Conv2DTranspose) else layer.output.shape
    pixels = int(np.prod(shape[1:3])) if len(shape) == 4 else 1
    return int(np.prod(layer.kernel.shape)) * pixels
