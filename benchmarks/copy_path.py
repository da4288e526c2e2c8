"""The copy path on real Fashion-MNIST: sections 1-4 of the cell, cut above the section-5 header, and README's
snippet after them, run in a fresh interpreter on the first 2048 training images (3 epochs; fit's batch 128 as in
README, or --batch-size) instead of Keras' download. Prints the history, the spread of the mixture prior's
component means, the last learning rate, and the PSNR of 1000 noisy test images and of their denoised copies
(mean over the images of 10 log10(1 / MSE)).

    python3 benchmarks/copy_path.py [--batch-size 32]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
from test_copy_path import DOWNLOAD, readme_snippet, sections_one_to_four  # noqa: E402

import vae_fashion as vf  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=None, help="fit's batch size (default: README's)")
    args = parser.parse_args()
    (x, y, x_test, y_test), source = vf.find_and_load_raw(None)  # uint8, as Keras' load_data() returns them
    snippet = readme_snippet().replace("x_test[:16]", "x_test[:1000]")
    if args.batch_size:
        snippet = snippet.replace("batch_size=config.batch_size, epochs", f"batch_size={args.batch_size}, epochs")
    with tempfile.TemporaryDirectory() as folder:
        np.savez(Path(folder) / "data.npz", x=x, y=y, x_test=x_test, y_test=y_test)
        cell = (sections_one_to_four()
                + snippet.replace(DOWNLOAD, "x, y, x_test, y_test = (np.load('data.npz')[k] for k in "
                                  "('x', 'y', 'x_test', 'y_test'))")
                + "test_clean = to_unit_float(x_test[:1000])\n"
                "test_noisy = add_noise(test_clean, config.noise_factor, seed=1)\n"
                "def psnr(images):\n"
                "    return float(np.mean(10 * np.log10(1 / np.mean((images - test_clean) ** 2, axis=(1, 2, 3)))))\n"
                "import json\n"
                "print(json.dumps({'history': {k: [round(float(v), 4) for v in vs] for k, vs in "
                "history.history.items()}, 'psnr_noisy': psnr(test_noisy), 'psnr_denoised': psnr(denoised),\n"
                "'spread': float(np.ptp(vae.prior.means.numpy(), axis=0).max()),\n"
                "'lr': float(vae.optimizer.learning_rate), 'steps': vae.steps_per_epoch}))\n")
        (Path(folder) / "cell.py").write_text(cell, encoding="utf-8")
        result = subprocess.run([sys.executable, "cell.py"], cwd=folder, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"data: {source}; CPU {vf.cpu_model_name()}")
    for name, values in outcome["history"].items():
        print(f"{name:12} " + "  ".join(f"{v:10.4f}" for v in values))
    print(f"{outcome['steps']} steps an epoch; the prior's 10 component means spread up to {outcome['spread']:.3f} "
          f"per dimension; the last learning rate {outcome['lr']:.3g}")
    print(f"PSNR of 1000 test images: noisy {outcome['psnr_noisy']:.2f} dB, denoised {outcome['psnr_denoised']:.2f} dB "
          f"({outcome['psnr_denoised'] - outcome['psnr_noisy']:+.2f} dB)")


if __name__ == "__main__":
    main()
