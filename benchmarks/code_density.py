"""Which density of the training codes, fitted after training, samples as well as the VAE reconstructs?
Compares candidates on finished runs, from their output folders alone (encoder.keras, decoder.keras, prior.npz,
config.json, metrics.csv):

    python3 benchmarks/code_density.py RUN_FOLDER [RUN_FOLDER ...]

For each run it re-encodes the fixed noisy training copy (the run's own settings and seeds), retrains the run's
Fréchet-distance classifier (same seed, same 3 epochs), checks that it reproduces the run's fd_vae_reconstruction,
and prints, for each candidate: its Fréchet distance to the clean test images (10,000 decoded samples, the run's
n), the ratio to the reconstructions' and the seconds its fit took on this CPU. The candidates: the trained
prior (prior.npz of a run before the ex-post generator, or its trained_* arrays); full-covariance Gaussian
mixtures of K components fitted by EM to a seeded subset of the training z_mean (--subset, --ks), to all 60,000
(K = 10, the earlier ex-post density, and K = 80), and to one posterior sample of each image; the K that BIC
picks among the subset's; a diagonal mixture; and the training codes themselves decoded (the limit of any
density of z_mean). Samples are drawn with the run's "prior_fd" stream, as fd_prior_samples is.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.mixture import GaussianMixture  # noqa: E402

import vae_fashion as vf  # noqa: E402


def mixture_parameters(mixture: GaussianMixture) -> dict:
    covariances = mixture.covariances_
    if mixture.covariance_type == "diag":
        return {"weights": mixture.weights_, "means": mixture.means_, "variances": covariances}
    return {"weights": mixture.weights_, "means": mixture.means_, "covariances": covariances}


def compare(folder: Path, ks, subset_size: int) -> list[dict]:
    record = json.loads((folder / "config.json").read_text())["config"]
    config = vf.Config(**{k: v for k, v in record.items() if k in vf.SETTINGS})
    stored = pd.read_csv(folder / "metrics.csv").set_index("name")["value"]
    data = vf.with_noise(vf.load_fashion_mnist(config), config)
    encoder, decoder = (keras.models.load_model(folder / name) for name in ("encoder.keras", "decoder.keras"))
    z_train, z_log_var = encoder.predict(data.x_train_noisy, batch_size=1024, verbose=0)
    z_test = encoder.predict(data.x_test_noisy, batch_size=1024, verbose=0)[0]

    classifier = vf.build_classifier(vf.seed_for(config, "classifier"))
    classifier.fit(data.x_train, data.y_train, batch_size=256, epochs=3, verbose=0)
    features = keras.Model(classifier.input, classifier.get_layer("features").output)
    n = min(len(data.x_test), len(data.x_train))

    def fd(latents) -> float:
        images = decoder.predict(np.asarray(latents, np.float32)[:n], batch_size=1024, verbose=0)
        return vf.frechet_distance(features.predict(images, batch_size=1024, verbose=0), reference)

    reference = features.predict(data.x_test[:n], batch_size=1024, verbose=0)
    recon = fd(z_test)
    rows = [{"density": "reconstructions decoder(z_mean(noisy test))", "fd": recon, "stored": stored.get(
        "fd_vae_reconstruction")}]
    rows.append({"density": "the training codes themselves (the limit)",
                 "fd": fd(z_train[vf.seeded_subset(len(z_train), n, vf.seed_for(config, "training_codes"))])})
    prior = np.load(folder / "prior.npz")
    trained = {k.removeprefix("trained_"): prior[k] for k in prior.files if k.startswith("trained_")} or dict(prior)
    rows.append({"density": "the trained prior", "fd": fd(vf.sample_mixture(trained, n, np.random.default_rng(
        vf.seed_for(config, "prior_fd"))))})

    posterior = z_train + np.exp(0.5 * z_log_var) * np.random.default_rng(0).standard_normal(z_train.shape)
    subset = vf.seeded_subset(len(z_train), subset_size, vf.seed_for(config, "expost_fit"))
    candidates = [("full", 10, z_train, "z_mean")]
    candidates += [("full", k, z_train[subset], "z_mean") for k in ks]
    candidates += [("full", 80, z_train, "z_mean"), ("diag", 160, z_train, "z_mean"),
                   ("full", 80, posterior[subset], "one posterior sample of each image")]
    bic = {}
    for kind, k, codes, what in candidates:
        name = f"{kind}, K={k}, {len(codes)} x {what}"
        began = time.perf_counter()
        mixture = GaussianMixture(k, covariance_type=kind, random_state=vf.seed_for(config, "expost_fit")).fit(codes)
        seconds = time.perf_counter() - began
        if kind == "full" and len(codes) == subset_size and what == "z_mean":
            bic[k] = mixture.bic(z_train)
        samples = vf.sample_mixture(mixture_parameters(mixture), n, np.random.default_rng(
            vf.seed_for(config, "prior_fd")))
        rows.append({"density": name, "fd": fd(samples), "fit_s": seconds, "iterations": mixture.n_iter_,
                     "converged": mixture.converged_})
        print(f"  {name}: FD {rows[-1]['fd']:.3f} ({rows[-1]['fd'] / recon:.3f}x), fit {seconds:.1f} s", flush=True)
    if bic:
        best = min(bic, key=bic.get)
        rows.append({"density": f"BIC (on all the codes) picks K={best} among {sorted(bic)}"})
    for row in rows:
        row["ratio"] = row["fd"] / recon if "fd" in row else None
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--ks", type=int, nargs="+", default=[40, 80, 120, 160],
                        help="components of the full mixtures fitted to the subset")
    parser.add_argument("--subset", type=int, default=20_000, help="seeded training codes those are fitted to")
    args = parser.parse_args()
    print(f"CPU {vf.cpu_model_name()}")
    for folder in args.folders:
        rows = compare(folder, args.ks, args.subset)
        print(f"\n{folder}")
        print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
