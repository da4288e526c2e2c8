"""How many components should each class's mixture have (setting conditional_components)? Measured on finished
runs, from their output folders alone (encoder.keras, decoder.keras, prior.npz, config.json):

    python3 benchmarks/conditional_components.py RUN_FOLDER [RUN_FOLDER ...] [--components 1,4,10,16] [--codes N]

For each run it rebuilds the run's data and codes, then runs the run's generation_quality() (its FD classifier,
trained as in the run) once per component count, and prints per class the Fréchet distance of the class's
samples ÷ that of the class's reconstructions (both against the class's test images, with the same counts), the
mean and worst ratio over the classes, the pooled fd_conditional_samples ÷ fd_vae_reconstruction and the
agreement beside reconstruction_agreement; per class, the last count's agreement beside the reconstructions'.
Issue 45's bounds: mean <= 1.05, worst <= 1.25, pooled <= 1.05, agreement >= reconstruction_agreement - 0.01.
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from analysis_costs import run_from_folder  # noqa: E402

import vae_fashion as vf  # noqa: E402


def measure(folder: Path, components: list[int], codes: int) -> pd.DataFrame:
    config, data, vae, z_train, _z_test, denoised = run_from_folder(folder)
    rows, per_class = [], {}
    for k in components:
        began = time.perf_counter()
        mixtures = vf.class_mixtures(z_train, data.y_train, k, vf.seed_for(config, "conditional_fit"), codes)
        fitted = time.perf_counter() - began
        figures = vf.generation_quality(vae, data, config, z_train, mixtures, denoised)
        ratios = np.array([figures[f"fd_conditional_{c}"] / figures[f"fd_reconstruction_{c}"]
                           for c in range(vf.NUM_CLASSES)])
        per_class[k] = ratios
        rows.append({"components": k, "fit s": fitted, "mean ratio": ratios.mean(), "worst ratio": ratios.max(),
                     "worst class": vf.CLASS_NAMES_EN[int(ratios.argmax())],
                     "pooled ratio": figures["fd_conditional_samples"] / figures["fd_vae_reconstruction"],
                     "agreement": figures["conditional_agreement"],
                     "reconstruction agreement": figures["reconstruction_agreement"]})
        print(f"  {k} components: {rows[-1]}", flush=True)
    reference = [figures[f"fd_reconstruction_{c}"] for c in range(vf.NUM_CLASSES)]
    # the run's classifier once more, for the agreement of each class's reconstructions (not in metrics.csv)
    classifier = vf.build_classifier(vf.seed_for(config, "classifier"))
    classifier.fit(data.x_train, data.y_train, batch_size=256, epochs=3, verbose=0)
    n = min(len(data.x_test), len(data.x_train))  # the images generation_quality() scores
    predicted = classifier.predict(denoised[:n], batch_size=1024, verbose=0).argmax(axis=1)
    classes = pd.DataFrame({"class": vf.CLASS_NAMES_EN, "fd_reconstruction": reference,
                            **{f"{k} comp. ratio": ratios for k, ratios in per_class.items()},
                            "reconstruction agreement": [np.mean(predicted[data.y_test[:n] == c] == c)
                                                         for c in range(vf.NUM_CLASSES)],
                            f"{k} comp. agreement": [figures[f"conditional_agreement_{c}"]
                                                     for c in range(vf.NUM_CLASSES)]})
    print(f"\n{folder} ({vf.cpu_model_name()}): per class, fd_conditional_<c> / fd_reconstruction_<c>")
    print(classes.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    table = pd.DataFrame(rows)
    print(f"\n{folder}: over the classes")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--components", default="1,4,10,16")
    parser.add_argument("--codes", type=int, default=vf.CONDITIONAL_FIT_SAMPLES, help="seeded codes per class fitted")
    arguments = parser.parse_args()
    for folder in arguments.folders:
        measure(folder, [int(k) for k in arguments.components.split(",")], arguments.codes)
