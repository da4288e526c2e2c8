"""Promises of the analysis (section 5) and the saved files that a one-line slip would break while a run still
finishes with plausible numbers: the wrong split, the wrong stream, the wrong setting, the wrong set. Each test
names the slip it catches; the references are small and independent of the code under test."""

import types
import warnings

import numpy as np
import pandas as pd
import pytest

import vae_fashion as vf
from conftest import bars_data

LATENT = 8


def _encode(images):
    """A stand-in encoder: the mean of each eighth of the image, as both z_mean and z_log_var."""
    codes = np.asarray(images, np.float64).reshape(len(images), LATENT, -1).mean(axis=-1)
    return codes, codes


def _generate(latents):
    """A stand-in decoder: an image filled with the latent's mean (so a set of decoded images shows its codes)."""
    values = np.asarray(latents, np.float32).mean(axis=1)
    return np.broadcast_to(values[:, None, None, None], (len(values), 28, 28, 1)).copy()


def _stand_in_vae():
    vae = types.SimpleNamespace(generator=None, sampled=[])
    vae.encode, vae.generate = _encode, _generate
    vae.denoise = lambda images: _generate(_encode(images)[0])

    def sample_generator(n, seed):  # the generator's codes decode to 0.9, the trained prior's to 0.1
        vae.sampled.append(("generator", n, seed))
        return np.full((n, LATENT), 0.9, np.float32)

    def sample_prior(n, seed):
        vae.sampled.append(("trained prior", n, seed))
        return np.full((n, LATENT), 0.1, np.float32)

    vae.sample_generator, vae.sample_prior = sample_generator, sample_prior
    return vae


@pytest.mark.parametrize("generator", ["expost", "prior"])
def test_analyse_fits_the_generator_to_the_noisy_training_codes_and_keeps_each_set_apart(monkeypatch, generator):
    """analyse(): the density is fitted to z_mean of the *noisy training* images (not test, not clean) with
    expost_components (not prior_components) and its own stream, and only with generator=expost; 07 shows the
    generator's samples and 07B the trained prior's; the probes encode the noisy training copy; PCA covers every
    test code. Each class's mixture is fitted to that class's noisy training codes with conditional_components,
    on a stream of its own."""
    fits = []

    def fit_generator(z, components, seed, size=vf.EXPOST_FIT_SAMPLES):
        fits.append((z, components, seed, size))
        return {"weights": np.ones(1), "means": z.mean(axis=0, keepdims=True), "covariances": np.eye(LATENT)[None]}

    monkeypatch.setattr(vf, "fit_generator", fit_generator)
    config = vf.Config(latent_dim=LATENT, seed=3, embed_samples=0, gen_metrics=False, classical_samples=5,
                       expost_components=3, prior_components=7, conditional_components=2, generator=generator)
    data = vf.with_noise(bars_data(n_train=400), config)  # 40 codes a class: room for 4 components of 8-d
    vae = _stand_in_vae()
    results = vf.analyse(vae, data, pd.DataFrame(), config, vf.StageTimer().stage)

    z_noisy_train = _encode(data.x_train_noisy)[0]
    class_fits = [fit for fit in fits if fit[2] == vf.seed_for(config, "conditional_fit")]
    assert len(class_fits) == 10
    for c, (z, components, _seed, size) in enumerate(class_fits):
        np.testing.assert_array_equal(z, z_noisy_train[data.y_train == c])
        assert components == 2 and size == vf.CONDITIONAL_FIT_SAMPLES
    fits = [fit for fit in fits if fit[2] != vf.seed_for(config, "conditional_fit")]
    if generator == "expost":
        assert len(fits) == 1
        z, components, seed, _size = fits[0]
        np.testing.assert_array_equal(z, z_noisy_train)
        assert components == 3 and seed == vf.seed_for(config, "expost_fit")
    else:
        assert fits == [] and vae.generator is None
    assert ("generator", 100, vf.seed_for(config, "prior_grid")) in vae.sampled
    assert ("trained prior", 100, vf.seed_for(config, "trained_prior_grid")) in vae.sampled
    np.testing.assert_allclose(results.generated_grid, 0.9, atol=1e-6)
    np.testing.assert_allclose(results.trained_prior_grid, 0.1, atol=1e-6)
    np.testing.assert_array_equal(results.z_mean_train, z_noisy_train)
    np.testing.assert_array_equal(results.z_mean_test, _encode(data.x_test_noisy)[0])
    assert results.representation == vf.representation_quality(
        z_noisy_train, data.y_train, _encode(data.x_test_noisy)[0], data.y_test,
        vf.seed_for(config, "silhouette_subset"))
    # PCA of the test codes, against numpy's SVD (a component's sign is free)
    centred = _encode(data.x_test_noisy)[0].astype(np.float64)
    centred -= centred.mean(axis=0)
    _u, singular, directions = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(results.pca_ratios, singular**2 / np.sum(singular**2), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.abs(results.pca_coords), np.abs(centred @ directions[:2].T), rtol=1e-3, atol=1e-4)


def test_with_noise_draws_each_split_from_its_own_stream_at_noise_factor():
    """with_noise(): the test copy from the test_noise stream, the training copy from train_noise_fixed, both at
    noise_factor (not 0.45, not the bare seed, not swapped)."""
    data, config = bars_data(30, 20), vf.Config(seed=5, noise_factor=0.2)
    out = vf.with_noise(data, config)
    np.testing.assert_array_equal(out.x_test_noisy, vf.add_noise(data.x_test, 0.2, vf.seed_for(config, "test_noise")))
    np.testing.assert_array_equal(out.x_train_noisy,
                                  vf.add_noise(data.x_train, 0.2, vf.seed_for(config, "train_noise_fixed")))


def test_seed_streams_are_distinct_and_apart_from_the_seed_itself():
    """README: the weights and batch order use `seed` itself, every other draw a stream of its own."""
    offsets = list(vf.SEED_OFFSETS.values())
    robustness = [vf.SEED_OFFSETS["robustness_noise"] + i for i in range(len(vf.ROBUSTNESS_SIGMAS))]
    others = [value for name, value in vf.SEED_OFFSETS.items() if name != "robustness_noise"]
    assert len(set(offsets)) == len(offsets) and 0 not in offsets
    assert not set(robustness) & set(others)


def test_silhouette_is_of_a_seeded_subset_of_test_codes_and_knn_asks_ten_neighbours():
    """METRICS: "silhouette_score of test z_mean" (not the training codes) on a seeded subset of
    silhouette_samples; "10-nearest-neighbour classifier" (not sklearn's default of 5)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (10, 3))
    y_train = np.arange(300) % 10
    z_train = centres[y_train] + rng.normal(0, 0.3, (300, 3))
    y_test = rng.integers(0, 10, 200)
    z_test = rng.normal(0, 1, (200, 3))  # no structure: the test silhouette is near 0, the training one near 1
    result = vf.representation_quality(z_train, y_train, z_test, y_test, seed=4, silhouette_samples=50)
    from sklearn.metrics import silhouette_score

    subset = vf.seeded_subset(200, 50, 4, in_order=False)
    assert result["silhouette_samples"] == 50
    assert result["silhouette"] == pytest.approx(silhouette_score(z_test[subset], y_test[subset]))
    assert result["silhouette"] < 0.2
    two = vf.representation_quality(z_train, y_train, z_test[:40], y_test[:40] % 2, seed=4, silhouette_samples=40)
    subset = vf.seeded_subset(40, 40, 4, in_order=False)  # two classes are enough for a silhouette
    assert two["silhouette"] == pytest.approx(silhouette_score(z_test[:40][subset], (y_test[:40] % 2)[subset]))

    # one test point at the origin: its 4 nearest training codes are class 0 (radius 1), the next 7 class 1
    # (radius 2). Ten neighbours vote class 1; five or one would vote class 0.
    angles = np.linspace(0, 2 * np.pi, 8)[:-1]
    z_train = np.vstack([np.eye(2), -np.eye(2), 2 * np.stack([np.cos(angles), np.sin(angles)], axis=1)])
    y_train = np.array([0] * 4 + [1] * 7)
    result = vf.representation_quality(z_train, y_train, np.zeros((1, 2)), np.array([1]), seed=0)
    assert result["knn10_accuracy"] == 1.0
    # exactly ten: five class-1 codes at radius 1, then class 0 at radius 2 (and class 1 at 3). Nine neighbours
    # vote class 1; ten tie 5:5, which the smaller label wins; eleven vote class 1 again.
    ring = np.stack([np.cos(angles[:5]), np.sin(angles[:5])], axis=1)
    for far, far_labels in ((2 * np.vstack([ring, [[0.0, 1.0]]]), [0] * 6), (np.vstack([2 * ring, [[0.0, 3.0]]]),
                                                                               [0] * 5 + [1])):
        z_train, y_train = np.vstack([ring, far]), np.array([1] * 5 + far_labels)
        result = vf.representation_quality(z_train, y_train, np.zeros((1, 2)), np.array([0]), seed=0)
        assert result["knn10_accuracy"] == 1.0


def test_classical_references_use_noise_factor_and_score_the_vae_on_the_same_subset():
    """CLASSICAL_DENOISERS: non-local means with sigma = noise_factor (not a fixed 0.45); vae_subset scores the
    VAE's output of the same seeded images (not the first ones)."""
    clean = np.zeros((60, 28, 28, 1), np.float32)
    clean[:, 6:22, 6:22] = 0.8
    config = vf.Config(classical_samples=25, noise_factor=0.2, seed=3)
    noisy = vf.add_noise(clean, 0.2, seed=1)
    denoised = clean + 0.002 * np.arange(60, dtype=np.float32)[:, None, None, None]  # each image its own error
    result = vf.classical_references(clean, noisy, denoised, config)
    from skimage.restoration import denoise_nl_means

    subset = vf.seeded_subset(60, 25, vf.seed_for(config, "classical_subset"))
    nlm = np.stack([denoise_nl_means(x, h=0.15 * 0.2, sigma=0.2, patch_size=3, patch_distance=2, fast_mode=True)
                    for x in noisy[subset, ..., 0].astype(np.float64)])
    assert result["nl_means_psnr"] == pytest.approx(vf.image_quality(clean[subset], nlm)["psnr"].mean())
    assert result["vae_subset_mse"] == pytest.approx(np.mean((denoised[subset] - clean[subset]) ** 2))


def test_frechet_distance_handles_covariances_that_do_not_commute(monkeypatch):
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)), here against the symmetric form
    Tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2) of the same sample moments. Diagonal covariances cannot tell
    this from sqrtm(C_a) @ sqrtm(C_b) or sqrt(C_a * C_b); these two can."""
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(0)
    a = rng.multivariate_normal([0, 0], [[4, 0], [0, 0.25]], 50_000)
    b = rng.multivariate_normal([1, 0], [[2.125, 1.875], [1.875, 2.125]], 50_000)  # a's covariance turned by 45°
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = sqrtm(ca).real
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb - 2 * sqrtm(root_a @ cb @ root_a).real)
    wrong = [np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb - 2 * root) for root in
             (root_a @ sqrtm(cb).real, np.sqrt(np.abs(ca * cb)))]
    assert all(abs(w - expected) > 0.3 for w in wrong)
    assert vf.frechet_distance(a, b) == pytest.approx(expected, rel=1e-4)
    # sqrtm may return a complex matrix whose imaginary part is rounding (older SciPy releases often do): the
    # distance is its real part, without a ComplexWarning
    monkeypatch.setattr(vf.linalg, "sqrtm", lambda m: sqrtm(m) + 1e-12j)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert vf.frechet_distance(a, b) == pytest.approx(expected, rel=1e-4)


def test_each_class_s_mixture_recovers_its_own_clusters_with_full_covariances():
    """Class 0 is two clusters of its own (turned opposite ways, 3:1), class 1 one: each class's mixture is
    scikit-learn's full-covariance EM on `size` seeded codes of that class alone, and its samples fill those
    clusters in their proportions (one Gaussian per class, or one mixture of all codes, would put samples between
    or in the other class's clusters)."""
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(1)
    means = np.array([[6.0, 0], [-6, 0], [0, 8]])
    z0 = np.vstack([rng.multivariate_normal(means[0], [[1, 0.8], [0.8, 1]], 3000),
                    rng.multivariate_normal(means[1], [[1, -0.8], [-0.8, 1]], 1000)])
    z1 = rng.multivariate_normal(means[2], [[0.5, 0], [0, 2]], 2000)
    z, labels = np.vstack([z0, z1]), np.repeat([0, 1], [4000, 2000])
    # two codes make a one-Gaussian mixture; a full covariance in 2-d needs 3 codes a component
    few = vf.class_mixtures(np.arange(16.0).reshape(8, 2) ** 1.5, np.array([0, 0, 1, 1, 1, 1, 1, 1]), 2, seed=0)
    assert list(few) == [0, 1] and [len(few[c]["means"]) for c in (0, 1)] == [1, 2]
    mixtures = vf.class_mixtures(z, labels, 2, seed=3, size=1000)
    assert list(mixtures) == [0, 1]
    reference = GaussianMixture(2, covariance_type="full", random_state=3).fit(z0[vf.seeded_subset(4000, 1000, 3)])
    order = np.argsort(mixtures[0]["means"][:, 0])[::-1]
    np.testing.assert_allclose(mixtures[0]["means"][order], reference.means_[np.argsort(reference.means_[:, 0])[::-1]])
    np.testing.assert_allclose(mixtures[0]["means"][order], means[:2], atol=0.1)
    np.testing.assert_allclose(mixtures[0]["covariances"][order], [[[1, 0.8], [0.8, 1]], [[1, -0.8], [-0.8, 1]]],
                               atol=0.1)
    latents, intended = vf.class_conditional_latents(mixtures, [8000, 4000], seed=2)
    nearest = np.argmin(((latents[:, None, :] - means[None]) ** 2).sum(axis=2), axis=1)
    np.testing.assert_allclose(np.bincount(nearest[intended == 0], minlength=3) / 8000, [0.75, 0.25, 0], atol=0.02)
    assert np.all(nearest[intended == 1] == 2)
    np.testing.assert_allclose(np.cov(latents[intended == 1], rowvar=False), [[0.5, 0], [0, 2]], atol=0.1)


def test_the_generator_is_fitted_to_size_seeded_codes():
    """fit_generator(): EM on `size` codes drawn by seeded_subset (not all codes, not the first ones)."""
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(0)
    z = np.vstack([rng.normal(-2, 0.5, (300, 2)), rng.normal(2, 0.5, (300, 2))])
    density = vf.fit_generator(z, 2, seed=1, size=100)
    reference = GaussianMixture(2, covariance_type="full", random_state=1).fit(z[vf.seeded_subset(600, 100, 1)])
    np.testing.assert_allclose(density["means"], reference.means_)
    np.testing.assert_allclose(density["covariances"], reference.covariances_)


def test_the_embedding_plots_label_the_seeded_subset_and_put_each_method_in_its_file(monkeypatch, tmp_path):
    """06C is UMAP and 06D t-SNE, each point labelled with its own test image's class (labels[subset], not the
    first labels), and latent_embeddings() embeds exactly the seeded subset of embed_samples test codes."""
    z = np.random.default_rng(0).normal(size=(300, 3))
    y_test = np.arange(300) % 10
    embedded = []
    monkeypatch.setattr(vf, "project_tsne", lambda codes, seed: embedded.append((codes, seed)) or codes[:, :2])
    monkeypatch.setattr(vf, "import_umap", lambda: (None, "not here"))
    config = vf.Config(embed_samples=40, seed=2)
    embeddings, warnings = vf.latent_embeddings(z, config, vf.StageTimer().stage)
    subset = vf.seeded_subset(300, 40, vf.seed_for(config, "embed_subset"))
    np.testing.assert_array_equal(embeddings["subset"], subset)
    np.testing.assert_array_equal(embedded[0][0], z[subset])
    assert embedded[0][1] == vf.seed_for(config, "tsne") and warnings and "UMAP" not in embeddings
    umap_module = types.SimpleNamespace()
    monkeypatch.setattr(vf, "import_umap", lambda: (umap_module, None))
    monkeypatch.setattr(vf, "project_umap", lambda codes, seed, module: embedded.append((codes, seed, module)) or
                        codes[:, 1:])
    embeddings, warnings = vf.latent_embeddings(z, config, vf.StageTimer().stage)
    np.testing.assert_array_equal(embedded[-1][0], z[subset])
    assert embedded[-1][1:] == (vf.seed_for(config, "umap"), umap_module) and not warnings
    np.testing.assert_array_equal(embeddings["UMAP"], z[subset][:, 1:])
    embedded.clear()
    assert vf.latent_embeddings(z, vf.Config(embed_samples=0), vf.StageTimer().stage)[0].keys() == {"subset"}
    assert embedded == []

    drawn = {}
    monkeypatch.setattr(vf, "plot_latent_scatter",
                        lambda coords, labels, title, path, *args: drawn.update({path: (coords, labels)}))
    results = types.SimpleNamespace(config=config, y_test=y_test, embeddings={
        "subset": subset, "t-SNE": np.full((40, 2), 1.0), "UMAP": np.full((40, 2), 2.0)})
    vf.draw_embeddings(results, [tmp_path / "06C", tmp_path / "06D"])
    assert drawn[tmp_path / "06D"][0][0, 0] == 1.0 and drawn[tmp_path / "06C"][0][0, 0] == 2.0
    for _coords, labels in drawn.values():
        np.testing.assert_array_equal(labels, y_test[subset])


def test_prior_npz_holds_the_generator_and_the_trained_prior_and_is_absent_when_both_are_n01(tmp_path):
    """save_models(): no prior.npz when the generator and the trained prior are both N(0, I); with a fitted
    density it holds weights, means, covariances (and trained_* only with a learned prior)."""
    vae = vf.build_vae(vf.Config(latent_dim=4, prior="normal"))
    vf.save_models(vae, tmp_path)
    assert not (tmp_path / "prior.npz").exists()
    vae.generator = {"weights": np.array([0.5, 0.5]), "means": np.zeros((2, 4)),
                        "covariances": np.stack([np.eye(4)] * 2)}
    vf.save_models(vae, tmp_path)
    with np.load(tmp_path / "prior.npz") as saved:
        assert set(saved.files) == {"weights", "means", "covariances"}
    mixture = vf.build_vae(vf.Config(latent_dim=4, prior="mixture", prior_components=3))
    mixture.generator = vae.generator
    vf.save_models(mixture, tmp_path)
    with np.load(tmp_path / "prior.npz") as saved:
        assert set(saved.files) == {"weights", "means", "covariances", "trained_weights", "trained_means",
                                    "trained_variances"}
        np.testing.assert_array_equal(saved["weights"], [0.5, 0.5])


def test_a_new_run_removes_every_output_of_the_previous_one_but_the_checkpoint(tmp_path):
    """prepare_output_dir(): an earlier run's files (a prior.npz or UMAP plot this run may not write, the models,
    the reports) are gone before any work, so none can pass for this run's; the checkpoint stays for resuming."""
    names = [name for output in vf.OUTPUTS for name in output.files if not name.endswith("/")]
    for name in names:
        (tmp_path / name).write_text("old")
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("the user's")
    vf.prepare_output_dir(tmp_path)
    assert [name for name in names if (tmp_path / name).exists()] == []
    assert (tmp_path / "checkpoint" / "state.json").exists() and (tmp_path / "notes.txt").exists()


def test_t_sne_and_umap_take_the_usual_neighbourhoods_shrunk_to_a_small_subset(monkeypatch):
    """Perplexity 30 and 15 neighbours (the libraries' defaults), at most a third / all of the other points of a
    small subset, never under 2; two components, PCA initialisation, seeded."""
    made = []

    class Recorder:
        def __init__(self, **kwargs):
            made.append(kwargs)

        def fit_transform(self, z):
            return z[:, :2]

    monkeypatch.setattr(vf, "TSNE", Recorder)
    for n, perplexity in ((1000, 30.0), (91, 30.0), (31, 10.0), (4, 2.0)):
        vf.project_tsne(np.zeros((n, 3)), seed=7)
        assert made.pop() == {"n_components": 2, "perplexity": perplexity, "init": "pca", "random_state": 7,
                              "n_jobs": -1}, n
    umap_module = types.SimpleNamespace(UMAP=Recorder)
    for n, neighbours in ((1000, 15), (16, 15), (9, 8), (2, 2)):
        vf.project_umap(np.zeros((n, 3)), 5, umap_module)
        assert made.pop() == {"n_neighbors": neighbours, "min_dist": 0.1, "random_state": 5}, n


def test_analyse_lays_out_each_grid_row_by_row_and_scores_the_references_on_their_own_images(monkeypatch):
    """The sample grids are 10 x 10 images of 28 x 28 x 1, sample r * 10 + c at row r, column c; the class grid
    has a row per class that has training codes (three here), ten samples each. The classical references compare
    the noisy input and the VAE's output, each with the clean images (MSE by hand on the same seeded subset);
    with gen_metrics, the generation metrics score the class mixtures and the VAE's output of the noisy test set."""
    scored = []
    monkeypatch.setattr(vf, "generation_quality", lambda vae, data, config, z, mixtures, denoised: scored.append(
        (sorted(mixtures), denoised)) or {})
    monkeypatch.setattr(vf, "metrics_table", lambda *args: pd.DataFrame())
    config = vf.Config(latent_dim=LATENT, seed=3, embed_samples=0, gen_metrics=True, classical_samples=7,
                       conditional_components=1)
    data = vf.with_noise(bars_data(n_train=400), config)
    three = data.y_train < 3
    data = vf.FashionMNIST(data.x_train[three], data.y_train[three], data.x_test, data.y_test, "bars",
                           data.x_train_noisy[three], data.x_test_noisy)
    vae = _stand_in_vae()
    vae.sample_generator = lambda n, seed: np.repeat(np.arange(n, dtype=np.float32)[:, None] / n, LATENT, axis=1)
    results = vf.analyse(vae, data, pd.DataFrame(), config, vf.StageTimer().stage)

    assert results.generated_grid.shape == results.trained_prior_grid.shape == (10, 10, 28, 28, 1)
    np.testing.assert_allclose(results.generated_grid[..., 0].mean(axis=(2, 3)), np.arange(100).reshape(10, 10) / 100,
                               atol=1e-6)
    assert results.conditional_grid.shape == (3, 10, 28, 28, 1) and list(results.conditional_classes) == [0, 1, 2]
    subset = vf.seeded_subset(len(data.x_test), 7, vf.seed_for(config, "classical_subset"))
    clean = data.x_test[subset].astype(np.float64)
    denoised = vae.denoise(data.x_test_noisy)
    assert results.classical["noisy_subset_mse"] == pytest.approx(np.mean((clean - data.x_test_noisy[subset]) ** 2))
    assert results.classical["vae_subset_mse"] == pytest.approx(np.mean((clean - denoised[subset]) ** 2))
    assert len(scored) == 1 and scored[0][0] == [0, 1, 2]
    np.testing.assert_array_equal(scored[0][1], denoised)
