"""Where does one training step's time go? Times parts of the step on one fixed batch.

    VAE_PRECISION=mixed_bfloat16 VAE_BATCH_SIZE=256 python3 benchmarks/profile_step.py

Each line is the median milliseconds per call of a tf.function over 30 calls (after 5 warm-up calls):
the whole train_step, the forward pass with every loss term, forward + backward without the optimizer,
the encoder and the decoder alone, and the tf.data input pipeline alone. The arithmetic rate is
estimated from the multiply-adds of the convolutions and dense layers (forward x 3 for a training step).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from profiling import fixed_batch, layer_macs, median_ms  # noqa: E402

import vae_fashion as vf  # noqa: E402

config = vf.config_from_env()  # the model and batch of the VAE_* settings (the default's unless set)
batch = config.batch_size
vf.setup_devices(config)
vae = vf.build_distributed_vae(config)  # the model run() trains
data = fixed_batch(batch)
epsilon = vf.keyed_normal((batch, config.latent_dim), vae.sampling.compute_dtype, vf.seed_for(config, "posterior"), 0)


def forward():
    return vae.compute_losses(data["noisy"], data["clean"], data["label"], epsilon, training=True)


def forward_backward():
    with tf.GradientTape() as tape:
        total = forward()["total_loss"]
    return tape.gradient(total, vae.trainable_weights)


images = np.zeros((60_000, 28, 28, 1), np.float32)
dataset = iter(vf.make_train_dataset(images, images, np.zeros(60_000, np.int32), config, 0))
parts = {
    "train_step (forward, backward, Adam)": tf.function(lambda: vae.train_step(data)),
    "forward + all loss terms": tf.function(forward),
    "forward + backward (no optimizer)": tf.function(forward_backward),
    "encoder forward": tf.function(lambda: vae.encoder(data["noisy"], training=True)),
    "decoder forward": tf.function(lambda: vae.decoder(tf.zeros((batch, config.latent_dim)), training=True)),
    "input pipeline (one batch)": lambda: next(dataset),
}


medians = {}
for name, fn in parts.items():
    medians[name] = median_ms(fn) / 1000
    print(f"{name:40s} {1000 * medians[name]:8.1f} ms", flush=True)
macs = sum(layer_macs(layer) for model in (vae.encoder, vae.decoder) for layer in model.layers)
step = medians["train_step (forward, backward, Adam)"]
print(f"precision {vf.resolve_precision(config)}, batch {batch}: {macs / 1e6:.1f} M multiply-adds per image forward; "
      f"train_step at {3 * 2 * macs * batch / step / 1e9:.0f} GFLOP/s (forward x 3)")
