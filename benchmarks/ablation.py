"""Train and evaluate one variant of the model and print its figures on one line, without writing an
output folder. The variant is any set of VAE_* settings (read by vf.config_from_env, as a run reads
them); the script's own knobs are its arguments:

    VAE_GAMMA_SC=1.0 python3 benchmarks/ablation.py scaled-1.0
    VAE_ENCODER_DEPTH=1 VAE_DECODER_DEPTH=1 VAE_OUTPUT_LAYER=conv python3 benchmarks/ablation.py depth-1
    VAE_BETA_MAX=0.5 python3 benchmarks/ablation.py beta-0.5 --posterior-samples 8

--posterior-samples N also reports the PSNR of averaging the decoder over N posterior samples instead
of decoding z_mean. Older ablations (filter widths, activations, a projection head, extra layers)
patched the model in and ran at commit 3e64e1f, where this script still had them (docs/RESULTS.md).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import vae_fashion as vf  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", default="", help="a label for the RESULT line")
    parser.add_argument("--posterior-samples", type=int, default=8,
                        help="posterior samples averaged for psnr_avg (0: skip)")
    args = parser.parse_args()

    config = vf.config_from_env()
    vf.setup_devices(config)
    data = vf.with_noise(vf.load_fashion_mnist(config), config)
    vae = vf.build_distributed_vae(config)
    began = time.perf_counter()
    history = vf.train_vae(vae, data.x_train_noisy, data.x_train, data.y_train, config, verbose=0)
    train_s = time.perf_counter() - began
    evaluated = vf.evaluate(vae, data, config)
    summary = vf.denoising_summary(evaluated["quality"])
    figures = {"psnr": round(summary["vae_psnr"], 3), "ssim": round(summary["vae_ssim"], 4)}
    if args.posterior_samples:
        z_mean, z_log_var = vae.encode(data.x_test_noisy)
        rng = np.random.default_rng(0)
        decoded = [vae.generate(z_mean + np.exp(0.5 * z_log_var) * rng.standard_normal(z_mean.shape).astype(np.float32))
                   for _ in range(args.posterior_samples)]
        figures["psnr_avg"] = round(float(vf.image_quality(data.x_test, np.mean(decoded, axis=0)).psnr.mean()), 3)
    figures.update({
        **{k: round(v, 4) for k, v in evaluated["representation"].items() if k != "silhouette_samples"},
        "kl_end": round(float(history.kl_loss.iloc[-1]), 2),
        "supcon_end": round(float(history.supcon_loss.iloc[-1]), 3),
        "train_s": round(train_s, 1), "parameters": vae.encoder.count_params() + vae.decoder.count_params(),
        "settings": {k: v for k, v in sorted(os.environ.items()) if k.startswith("VAE_")},
    })
    print("RESULT", args.name, json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
