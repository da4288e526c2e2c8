"""Per-layer profile of one training step: each layer of the encoder and decoder alone, at its real input
shape, forward and forward + backward (gradients for its input and its weights).

    VAE_PRECISION=float32 python3 benchmarks/profile_layers.py
    VAE_PRECISION=mixed_bfloat16 VAE_OUTPUT_LAYER=conv VAE_ENCODER_DEPTH=1 python3 benchmarks/profile_layers.py

The model is the one the VAE_* settings describe (the default's unless set).

Prints, per layer, the median ms of 30 calls (after 5 warm-ups), its multiply-adds and GFLOP/s of the
forward + backward pass (3x forward), then the sum over layers beside the whole train_step, so what is
not in any layer (losses, sampling, Adam, casts, the framework) shows as the difference.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from profiling import fixed_batch, layer_macs, median_ms  # noqa: E402

import vae_fashion as vf  # noqa: E402

config = vf.config_from_env()
batch = config.batch_size
vf.setup_devices(config)
vae = vf.build_vae(config)


rows = []
for model in (vae.encoder, vae.decoder):
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer) or isinstance(layer, vf.Sampling):
            continue
        inputs = layer.input if not isinstance(layer.input, list) else None
        if inputs is None:
            continue
        dtype = layer.compute_dtype
        x = tf.random.uniform((batch, *inputs.shape[1:]), dtype=dtype)

        def forward(layer=layer, x=x):
            return layer(x, training=True)

        def forward_backward(layer=layer, x=x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(tf.cast(y, tf.float32))
            return tape.gradient(loss, [x, *layer.trainable_weights])

        fwd = median_ms(tf.function(forward))
        both = median_ms(tf.function(forward_backward))
        macs = layer_macs(layer) * batch
        rows.append((f"{model.name}/{layer.name}", tuple(layer.output.shape[1:]), fwd, both, macs))

data = fixed_batch(batch)
step = median_ms(tf.function(lambda: vae.train_step(data)))

print(f"{keras.mixed_precision.global_policy().name}, batch {batch}, encoder depth {config.encoder_depth}, "
      f"decoder depth {config.decoder_depth}, output layer {config.output_layer}; {vf.cpu_model_name()}")
print(f"{'layer':34s} {'output':>14s} {'fwd ms':>8s} {'fwd+bwd ms':>11s} {'MMAC':>7s} {'GFLOP/s':>8s}")
for name, shape, fwd, both, macs in rows:
    rate = f"{6 * macs / both / 1e6:8.0f}" if macs else f"{'':8s}"
    print(f"{name:34s} {str(shape):>14s} {fwd:8.1f} {both:11.1f} {macs / 1e6:7.0f} {rate}")
total = sum(r[3] for r in rows)
print(f"{'sum of layers, forward + backward':49s} {sum(r[2] for r in rows):8.1f} {total:11.1f}")
print(f"whole train_step {step:.1f} ms; outside the layers {step - total:.1f} ms ({(step - total) / step:.0%})")
