"""Compare the output folders of two seeded runs, as a refactor must leave them: metrics.csv, history.csv and
noise_robustness.csv digit for digit, every PNG pixel for pixel. Prints one line per difference and exits 1 if
there is any.

    python3 tools/compare_runs.py BEFORE_FOLDER AFTER_FOLDER

A small seeded run to compare, made once with each version of vae_fashion.py:

    VAE_EPOCHS=3 VAE_WARMUP_EPOCHS=2 VAE_BATCH_SIZE=128 VAE_TRAIN_SAMPLES=2048 VAE_TEST_SAMPLES=500 \\
      VAE_EMBED_SAMPLES=300 VAE_CLASSICAL_SAMPLES=40 VAE_SEED=3 VAE_OUT_DIR=FOLDER python3 vae_fashion.py
"""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def differences(before: Path, after: Path) -> list[str]:
    found = []
    for name in ("metrics.csv", "history.csv", "noise_robustness.csv"):
        a, b = pd.read_csv(before / name), pd.read_csv(after / name)
        numbers = a.select_dtypes("number").columns
        if a.shape != b.shape or list(a.columns) != list(b.columns):
            found.append(f"{name}: shape or columns differ")
        elif not np.array_equal(a[numbers].to_numpy(), b[numbers].to_numpy(), equal_nan=True):
            rows = ~np.all((a[numbers].to_numpy() == b[numbers].to_numpy())
                           | (a[numbers].isna().to_numpy() & b[numbers].isna().to_numpy()), axis=1)
            found.append(f"{name}: rows differ:\n{pd.concat([a[rows], b[rows]]).to_string()}")
    pictures = {p.name for p in before.glob("*.png")} | {p.name for p in after.glob("*.png")}
    for name in sorted(pictures):
        if not (before / name).exists() or not (after / name).exists():
            found.append(f"{name}: only in one folder")
            continue
        a, b = (np.asarray(Image.open(folder / name)) for folder in (before, after))
        if a.shape != b.shape:
            found.append(f"{name}: {a.shape} vs {b.shape}")
        elif not np.array_equal(a, b):
            found.append(f"{name}: {100 * np.mean(np.any(a != b, axis=-1)):.2f} % of the pixels differ")
    return found


if __name__ == "__main__":
    found = differences(Path(sys.argv[1]), Path(sys.argv[2]))
    print("\n".join(found) if found else "identical: metrics.csv, history.csv, noise_robustness.csv and every PNG")
    sys.exit(1 if found else 0)
