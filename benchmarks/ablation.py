"""Train + evaluate one variant of the model and print its figures on one line.

The README's ablation figures come from this script and from full runs. Settings
come from the usual VAE_* variables (VAE_GAMMA_SC, VAE_SUPCON_SCALE,
VAE_FRESH_NOISE, VAE_EPOCHS, ...); the variants the pipeline has no setting for
are patched in here with ABL_* variables:

    ABL_ENCODER=64,128   filters of the two stride-2 encoder convolutions (default 32,64)
    ABL_DECODER=128,64   filters of the two transposed decoder convolutions (default 64,32)
    ABL_HEAD=64          SupCon on a 2-layer projection head of z_mean instead of z_mean itself
    ABL_ACTIVATION=silu  activation of the hidden layers (default relu)
    ABL_ENC_EXTRA=0,1    stride-1 convolutions added after each encoder level (14x14, 7x7)
    ABL_DEC_EXTRA=1,0,0  stride-1 convolutions added in the decoder at 7x7, 14x14, 28x28
    ABL_OUTPUT=subpixel  the decoder's last level: conv (transposed conv to 28x28 + 3x3 conv),
                         subpixel (vf.subpixel_logits: 3x3 conv to 4 channels at 14x14 + pixel shuffle)

When any of ABL_ENC_EXTRA, ABL_DEC_EXTRA, ABL_OUTPUT is set, its layout (one convolution per level plus
the extras) replaces the model of VAE_ENCODER_DEPTH / VAE_DECODER_DEPTH / VAE_OUTPUT_LAYER; ABL_OUTPUT
then defaults to conv.

    VAE_GAMMA_SC=1.0 python benchmarks/ablation.py scaled-1.0
    VAE_EPOCHS=6 VAE_WARMUP_EPOCHS=3 VAE_SUPCON_SCALE=none VAE_GAMMA_SC=50 ABL_HEAD=64 python benchmarks/ablation.py head

It also reports the PSNR of averaging the decoder over 8 posterior samples
instead of decoding z_mean. No output folder is written.
"""

import functools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402

import vae_fashion as vf  # noqa: E402

ENCODER = [int(f) for f in os.environ.get("ABL_ENCODER", "32,64").split(",")]
DECODER = [int(f) for f in os.environ.get("ABL_DECODER", "64,32").split(",")]
HEAD = int(os.environ.get("ABL_HEAD", "0"))
ACTIVATION = os.environ.get("ABL_ACTIVATION", "relu")
ENC_EXTRA = [int(n) for n in os.environ.get("ABL_ENC_EXTRA", "0,0").split(",")]
DEC_EXTRA = [int(n) for n in os.environ.get("ABL_DEC_EXTRA", "0,0,0").split(",")]
OUTPUT = os.environ.get("ABL_OUTPUT", "conv")


def build_encoder_layout(config, **_):
    inputs = keras.Input(shape=(28, 28, 1), name="noisy_image")
    x = inputs
    for width, extra in zip(ENCODER, ENC_EXTRA):
        x = layers.Conv2D(width, 3, strides=2, padding="same", activation=ACTIVATION)(x)
        for _ in range(extra):
            x = layers.Conv2D(width, 3, padding="same", activation=ACTIVATION)(x)
    x = layers.Dense(config.hidden_units, activation=ACTIVATION)(layers.Flatten()(x))
    z_mean = layers.Dense(config.latent_dim, name="z_mean", dtype="float32")(x)
    z_log_var = layers.Dense(config.latent_dim, name="z_log_var", dtype="float32")(x)
    return keras.Model(inputs, [z_mean, z_log_var], name="encoder")


def build_decoder_layout(config, **_):
    latent = keras.Input(shape=(config.latent_dim,), name="z")
    x = layers.Dense(config.hidden_units, activation=ACTIVATION)(latent)
    x = layers.Dense(7 * 7 * DECODER[0], activation=ACTIVATION)(x)
    x = layers.Reshape((7, 7, DECODER[0]))(x)
    for _ in range(DEC_EXTRA[0]):
        x = layers.Conv2D(DECODER[0], 3, padding="same", activation=ACTIVATION)(x)
    x = layers.Conv2DTranspose(DECODER[0], 3, strides=2, padding="same", activation=ACTIVATION)(x)
    for _ in range(DEC_EXTRA[1]):
        x = layers.Conv2D(DECODER[0], 3, padding="same", activation=ACTIVATION)(x)
    if OUTPUT == "subpixel":
        logits = vf.subpixel_logits(x)
    else:
        x = layers.Conv2DTranspose(DECODER[1], 3, strides=2, padding="same", activation=ACTIVATION)(x)
        for _ in range(DEC_EXTRA[2]):
            x = layers.Conv2D(DECODER[1], 3, padding="same", activation=ACTIVATION)(x)
        logits = layers.Conv2D(1, 3, padding="same", name="logits")(x)
    image = layers.Activation("sigmoid", name="image", dtype="float32")(logits)
    return keras.Model(latent, image, name="decoder")


LAYOUT = any(ENC_EXTRA) or any(DEC_EXTRA) or OUTPUT != "conv"


class HeadVAE(vf.VAE):
    """SupCon on head(z_mean); the head is thrown away after training."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.head = keras.Sequential([layers.Dense(HEAD, activation="relu"), layers.Dense(HEAD, dtype="float32")])

    def supcon_features(self, z_mean):
        return self.head(z_mean)


def main():
    # build_vae looks these up in vf, so the variants are patched in there
    if LAYOUT:
        vf.build_encoder, vf.build_decoder = build_encoder_layout, build_decoder_layout
    else:
        vf.build_encoder = functools.partial(vf.build_encoder, filters=ENCODER, activation=ACTIVATION)
        vf.build_decoder = functools.partial(vf.build_decoder, filters=DECODER, activation=ACTIVATION)
    if HEAD:
        vf.VAE = HeadVAE
    config = vf.config_from_env()
    vf.setup_devices(config)
    data = vf.with_noise(vf.load_fashion_mnist(config), config)
    vae = vf.build_vae(config, len(data.x_train))
    if HEAD:  # build the head's variables before the optimizer sees the weights
        vae.compute_losses(data.x_train_noisy[:4], data.x_train[:4], data.y_train[:4])
    began = time.perf_counter()
    history = vf.train_vae(vae, data.x_train_noisy, data.x_train, data.y_train, config, verbose=0)
    train_s = time.perf_counter() - began
    evaluated = vf.evaluate(vae, data, config)
    summary = vf.denoising_summary(evaluated["quality"])
    z_mean, z_log_var = vae.encode(data.x_test_noisy)
    rng = np.random.default_rng(0)
    samples = [z_mean + np.exp(0.5 * z_log_var) * rng.standard_normal(z_mean.shape).astype(np.float32) for _ in range(8)]
    averaged = vf.image_quality(data.x_test, np.mean([vae.generate(z) for z in samples], axis=0))
    figures = {
        "psnr": round(summary["vae_psnr"], 3), "ssim": round(summary["vae_ssim"], 4),
        "psnr_avg8": round(float(averaged.psnr.mean()), 3),
        **{k: round(v, 4) for k, v in evaluated["representation"].items() if k != "silhouette_samples"},
        "kl_end": round(float(history.kl_loss.iloc[-1]), 2), "supcon_end": round(float(history.supcon_loss.iloc[-1]), 3),
        "train_s": round(train_s, 1), "parameters": vae.encoder.count_params() + vae.decoder.count_params(),
        "settings": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("VAE_", "ABL_"))},
    }
    print("RESULT", sys.argv[1] if len(sys.argv) > 1 else "", json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
