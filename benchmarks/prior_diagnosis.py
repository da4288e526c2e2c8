"""Why does the linear probe fall where the learned prior raises the silhouette? Compares finished runs
class by class, from their output folders alone (encoder.keras, prior.npz, config.json):

    python3 benchmarks/prior_diagnosis.py RUN_FOLDER [RUN_FOLDER ...]

For each run it re-encodes the fixed noisy training and test copies (the run's own settings and seeds),
refits the linear probe and the kNN classifier of metrics.csv, and prints, per class: probe and kNN
accuracy, the class most often predicted instead, the class's spread (mean distance of its test z_mean
to the class mean, in units of the mean distance between class means) and, with a mixture prior, the
share of the class's test images whose most responsible prior component belongs to another class
(the component's majority class on the training set), overall and among the probe's errors.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from scipy.special import logsumexp  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

import vae_fashion as vf  # noqa: E402


def responsibilities(z: np.ndarray, prior) -> np.ndarray:
    """(n, K) posterior component probabilities under the saved mixture (diagonal or full)."""
    weights, means = prior["weights"], prior["means"]
    if "covariances" in prior:
        factors = np.linalg.cholesky(prior["covariances"])
        centred = z[None, :, :] - means[:, None, :]
        whitened = np.linalg.solve(factors, np.transpose(centred, (0, 2, 1)))
        log_det = np.log(np.diagonal(factors, axis1=1, axis2=2)).sum(axis=1)
        log_pdf = (-0.5 * (whitened ** 2).sum(axis=1) - log_det[:, None]).T
    else:
        variances = prior["variances"]
        log_pdf = -0.5 * (((z[:, None, :] - means[None]) ** 2) / variances[None] + np.log(variances)[None]).sum(axis=2)
    log_joint = np.log(weights)[None] + log_pdf
    return np.exp(log_joint - logsumexp(log_joint, axis=1, keepdims=True))


def diagnose(folder: Path) -> dict:
    record = json.loads((folder / "config.json").read_text())["config"]
    config = vf.Config(**{k: v for k, v in record.items() if k in vf.SETTINGS})
    data = vf.with_noise(vf.load_fashion_mnist(config), config)
    encoder = keras.models.load_model(folder / "encoder.keras")
    z_train = encoder.predict(data.x_train_noisy, batch_size=1024, verbose=0)[0]
    z_test = encoder.predict(data.x_test_noisy, batch_size=1024, verbose=0)[0]
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(z_train, data.y_train)
    knn = KNeighborsClassifier(n_neighbors=10, n_jobs=-1).fit(z_train, data.y_train)
    predicted, knn_predicted, y = probe.predict(z_test), knn.predict(z_test), data.y_test
    centres = np.array([z_test[y == c].mean(axis=0) for c in range(vf.NUM_CLASSES)])
    between = np.mean([np.linalg.norm(a - b) for i, a in enumerate(centres) for b in centres[i + 1:]])
    rows = []
    prior = None
    if (folder / "prior.npz").exists():  # the trained prior: trained_* since the generator is fitted after training
        saved = np.load(folder / "prior.npz")
        trained = {name.removeprefix("trained_"): saved[name] for name in saved.files if name.startswith("trained_")}
        prior = trained or (dict(saved) if "variances" in saved.files else None)
    if prior is not None:
        owner_train = responsibilities(z_train, prior).argmax(axis=1)
        majority = np.array([np.bincount(data.y_train[owner_train == k], minlength=10).argmax()
                             if np.any(owner_train == k) else -1 for k in range(len(prior["weights"]))])
        test_owner_class = majority[responsibilities(z_test, prior).argmax(axis=1)]
    for c in range(vf.NUM_CLASSES):
        mine = y == c
        wrong = np.bincount(predicted[mine & (predicted != c)], minlength=10)
        row = {"class": vf.CLASS_NAMES_EN[c], "probe": float(np.mean(predicted[mine] == c)),
               "knn": float(np.mean(knn_predicted[mine] == c)), "instead": vf.CLASS_NAMES_EN[int(wrong.argmax())],
               "spread": float(np.linalg.norm(z_test[mine] - centres[c], axis=1).mean() / between)}
        if prior is not None:
            errors = mine & (predicted != c)
            row["other_component"] = float(np.mean(test_owner_class[mine] != c))
            row["other_component_among_errors"] = float(np.mean(test_owner_class[errors] != c)) if errors.any() else 0.0
            row["errors_in_the_predicted_class_component"] = (
                float(np.mean(test_owner_class[errors] == predicted[errors])) if errors.any() else 0.0)
        rows.append(row)
    summary = {"run": folder.name, "prior": config.prior, "probe": float(np.mean(predicted == y)),
               "knn": float(np.mean(knn_predicted == y)), "rows": rows}
    if prior is not None:
        summary["components_per_class"] = np.bincount(majority[majority >= 0], minlength=10).tolist()
        summary["effective_components"] = float(1.0 / np.sum(prior["weights"] ** 2))
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders")
    args = parser.parse_args()
    for folder in args.runs:
        summary = diagnose(folder)
        print(f"\n{summary['run']} (prior {summary['prior']}): probe {summary['probe']:.4f}, kNN {summary['knn']:.4f}"
              + (f"; components per class {summary['components_per_class']}, effective components "
                 f"{summary['effective_components']:.1f}" if "components_per_class" in summary else ""))
        for row in summary["rows"]:
            extra = ""
            if "other_component" in row:
                extra = (f"  other-class component {100 * row['other_component']:5.1f} % (errors "
                         f"{100 * row['other_component_among_errors']:5.1f} %, of those in the predicted class's "
                         f"{100 * row['errors_in_the_predicted_class_component']:5.1f} %)")
            print(f"  {row['class']:12} probe {row['probe']:.3f}  kNN {row['knn']:.3f}  instead {row['instead']:12} "
                  f"spread {row['spread']:.3f}{extra}")
        print("JSON " + json.dumps(summary))


if __name__ == "__main__":
    main()
