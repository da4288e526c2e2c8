"""A no-bottleneck reference: a denoiser with no latent bottleneck, trained as the VAE is trained.

A small U-Net (28x28 -> 14x14 -> 7x7 and back, with skip connections at 28x28 and 14x14, so no
latent bottleneck; 0.47 M parameters) learns clean from noisy by BCE on logits, on the same
data, noise (a new draw every epoch, keyed as the VAE's), batch size, learning-rate schedule,
precision and epochs as the VAE (the VAE_* settings, the default's unless set). It is scored on the
VAE's fixed noisy test copy: PSNR (mean of per-image), pooled PSNR and SSIM, as metrics.csv defines
them. A reference for what this noise allows at this training budget, not a VAE (it has no latent space and
cannot generate) and not a bound (bigger or longer-trained denoisers do better).

    python3 benchmarks/unet_reference.py    # 2-core AMD EPYC (family 26): 803 s; PSNR 20.35, pooled 19.86, SSIM 0.760
    VAE_EPOCHS=5 VAE_TRAIN_SAMPLES=20000 python3 benchmarks/unet_reference.py   # a quick proxy

The last line: RESULT {"psnr": ..., "psnr_pooled": ..., "ssim": ..., ...}
"""

import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
from keras import layers  # noqa: E402

import vae_fashion as vf  # noqa: E402


def build_unet(widths=(32, 64, 128)) -> keras.Model:
    """Noisy image -> logits of the clean image."""
    inputs = keras.Input(shape=(28, 28, 1))
    skips, x = [], inputs
    for level, width in enumerate(widths):
        x = layers.Conv2D(width, 3, strides=1 if level == 0 else 2, padding="same", activation="relu")(x)
        x = layers.Conv2D(width, 3, padding="same", activation="relu")(x)
        skips.append(x)
    for width, skip in zip(widths[-2::-1], skips[-2::-1]):
        x = layers.Conv2DTranspose(width, 3, strides=2, padding="same", activation="relu")(x)
        x = layers.Conv2D(width, 3, padding="same", activation="relu")(layers.Concatenate()([x, skip]))
    logits = layers.Conv2D(1, 3, padding="same", dtype="float32")(x)
    return keras.Model(inputs, logits, name="unet")


def main():
    config = vf.config_from_env()
    vf.setup_devices(config)
    data = vf.with_noise(vf.load_fashion_mnist(config), config)
    keras.utils.set_random_seed(config.seed)
    unet = build_unet()
    steps = math.ceil(len(data.x_train) / config.batch_size)
    unet.compile(optimizer=keras.optimizers.Adam(vf.learning_rate_schedule(config, config.epochs * steps)),
                 loss=keras.losses.BinaryCrossentropy(from_logits=True))
    batches = vf.make_train_dataset(data.x_train_noisy, data.x_train, data.y_train, config, 0).map(
        lambda batch: (batch["noisy"], batch["clean"]))
    began = time.perf_counter()
    history = unet.fit(batches, epochs=config.epochs, steps_per_epoch=steps, verbose=2)
    train_s = time.perf_counter() - began
    denoiser = keras.Sequential([unet, layers.Activation("sigmoid", dtype="float32")])
    denoised = denoiser.predict(data.x_test_noisy, batch_size=1024, verbose=0)
    means = vf.quality_means({"unet": vf.image_quality(data.x_test, denoised),
                              "noisy": vf.image_quality(data.x_test, data.x_test_noisy)})
    figures = {
        "psnr": round(means["unet_psnr"], 3), "psnr_pooled": round(means["unet_psnr_pooled"], 3),
        "ssim": round(means["unet_ssim"], 4), "noisy_psnr": round(means["noisy_psnr"], 3),
        "bce_end": round(float(history.history["loss"][-1]), 5), "train_s": round(train_s, 1),
        "parameters": unet.count_params(), "epochs": config.epochs, "train_images": len(data.x_train),
        "test_images": len(data.x_test), "precision": keras.mixed_precision.global_policy().name,
        "cpu": vf.cpu_model_name(),
    }
    print("RESULT", json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
