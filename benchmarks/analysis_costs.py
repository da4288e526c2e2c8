"""What do the costliest analysis stages cost, and what would a cheaper setting change? Measured on finished runs,
from their output folders alone (encoder.keras, decoder.keras, prior.npz, config.json, metrics.csv):

    python3 benchmarks/analysis_costs.py RUN_FOLDER [RUN_FOLDER ...]

For each run it rebuilds the run's data and codes, then times, on this CPU:
- generation_quality() with the FD classifier trained for 3 epochs (the run's: its figures must equal the run's
  metrics.csv) and for fewer, printing every Fréchet distance and the generator's ratio to the reconstructions';
- UMAP of the run's seeded test subset: the first call (numba's compilation included, as in a run), then again,
  then with fewer optimisation epochs; t-SNE likewise with fewer iterations. Each embedding is drawn to
  RUN_FOLDER/analysis_costs/ to be compared by eye with the run's 06C / 06D.
"""

import json
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import vae_fashion as vf  # noqa: E402

FD_NAMES = ["classifier_test_accuracy", "fd_clean_train", "fd_vae_reconstruction", "fd_prior_samples",
            "fd_trained_prior_samples", "fd_training_codes", "fd_conditional_samples", "fd_noisy_input"]


def timed(fn):
    began = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - began


def run_from_folder(folder: Path):
    """The run's config, data (with its noise), a stand-in VAE from its saved models, training and test codes,
    and reconstructions."""
    record = json.loads((folder / "config.json").read_text())["config"]
    config = vf.Config(**{k: v for k, v in record.items() if k in vf.SETTINGS})
    vf.setup_devices(config)  # the run's precision: the classifier trains in it too
    data = vf.with_noise(vf.load_fashion_mnist(config), config)
    encoder, decoder = (keras.models.load_model(folder / name) for name in ("encoder.keras", "decoder.keras"))
    z_train = encoder.predict(data.x_train_noisy, batch_size=1024, verbose=0)[0]
    z_test = encoder.predict(data.x_test_noisy, batch_size=1024, verbose=0)[0]
    denoised = decoder.predict(z_test, batch_size=1024, verbose=0)
    prior = np.load(folder / "prior.npz")
    generator = {k: prior[k] for k in ("weights", "means", "covariances")}
    trained = {k.removeprefix("trained_"): prior[k] for k in prior.files if k.startswith("trained_")}
    vae = types.SimpleNamespace(
        generate=lambda z: decoder.predict(np.asarray(z, np.float32), batch_size=1024, verbose=0),
        sample_generator=lambda n, seed: vf.sample_mixture(generator, n, np.random.default_rng(seed)),
        sample_prior=lambda n, seed: vf.sample_mixture(trained, n, np.random.default_rng(seed)))
    return config, data, vae, z_train, z_test, denoised


def compare(folder: Path) -> None:
    config, data, vae, z_train, z_test, denoised = run_from_folder(folder)
    stored = pd.read_csv(folder / "metrics.csv").set_index("name")["value"]
    mixtures = vf.class_mixtures(z_train, data.y_train, config.conditional_components,
                                 vf.seed_for(config, "conditional_fit"))
    rows = []
    for epochs in (3, 2, 1):
        figures, seconds = timed(lambda e=epochs: vf.generation_quality(vae, data, config, z_train, mixtures,
                                                                        denoised, e))
        row = {"classifier epochs": epochs, "seconds": seconds, **{k: figures[k] for k in FD_NAMES}}
        row["generator / recon"] = figures["fd_prior_samples"] / figures["fd_vae_reconstruction"]
        rows.append(row)
    rows.append({"classifier epochs": "run's metrics.csv", **{k: stored[k] for k in FD_NAMES},
                 "generator / recon": stored["fd_prior_samples"] / stored["fd_vae_reconstruction"]})
    print(f"\n{folder}: generation quality")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4f}"))

    subset = vf.seeded_subset(len(z_test), config.embed_samples, vf.seed_for(config, "embed_subset"))
    umap_module, _ = vf.import_umap()
    seed = vf.seed_for(config, "umap")
    n_neighbors = int(min(15, max(2, len(subset) - 1)))
    runs = {
        "UMAP, first call": lambda: vf.project_umap(z_test[subset], seed, umap_module),
        "UMAP, again": lambda: vf.project_umap(z_test[subset], seed, umap_module),
        "UMAP, n_epochs=200": lambda: umap_module.UMAP(n_neighbors=n_neighbors, min_dist=0.1, random_state=seed,
                                                      n_epochs=200).fit_transform(z_test[subset]),
        "t-SNE": lambda: vf.project_tsne(z_test[subset], vf.seed_for(config, "tsne")),
    }
    out = folder / "analysis_costs"
    out.mkdir(exist_ok=True)
    print(f"\n{folder}: embeddings of {len(subset)} test codes ({vf.cpu_model_name()})")
    for name, run in runs.items():
        coords, seconds = timed(run)
        print(f"  {name}: {seconds:.1f} s")
        path = out / (name.replace(", ", "_").replace("=", "").replace(" ", "_") + ".png")
        vf.plot_latent_scatter(coords, data.y_test[subset], name, path)


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        compare(Path(folder))
