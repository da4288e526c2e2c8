"""Generation-quality helpers, latent traversal, saved models, devices and precision."""

import os
import subprocess
import sys
import types
import warnings

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import vae_fashion as vf
from conftest import ROOT, synthetic_split


def test_frechet_distance_matches_gaussian_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 2.0, (200_000, 1))
    b = rng.normal(-0.5, 0.5, (200_000, 1))
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert vf.frechet_distance(a, b) == pytest.approx(1.5**2 + 1.5**2, rel=0.01)
    # independent diagonal Gaussians: sum over dimensions of the 1-D form
    sd_a, sd_b = np.array([1.0, 2.0, 0.5]), np.array([0.5, 1.0, 1.5])
    x = rng.normal(0, 1, (200_000, 3)) * sd_a
    y = rng.normal(0, 1, (200_000, 3)) * sd_b + [1.0, 0.0, 0.0]
    assert vf.frechet_distance(x, y) == pytest.approx(1.0 + np.sum((sd_a - sd_b) ** 2), rel=0.02)
    assert vf.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    # a dead unit (a feature always 0, as a dead ReLU gives) makes both covariances singular: the distance is
    # that of the live units, computed without SciPy's warning that the matrix may have no square root
    dead = np.zeros((len(x), 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert vf.frechet_distance(np.hstack([x, dead]), np.hstack([y, dead])) == pytest.approx(
            vf.frechet_distance(x, y), rel=1e-5)


def test_normalised_entropy():
    assert vf.normalised_entropy(np.full(10, 7)) == pytest.approx(1.0)
    assert vf.normalised_entropy(np.eye(10)[3] * 50) == 0.0
    two = np.zeros(10)
    two[:2] = 5
    assert vf.normalised_entropy(two) == pytest.approx(np.log(2) / np.log(10))


def test_latent_traversal_is_centred_on_the_mean_along_principal_directions():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1, (2000, 4)) * [3.0, 1.0, 0.5, 0.1] + [1.0, 2.0, 0.0, 0.0]
    grid, ratios = vf.latent_traversal(vf.PCA().fit(z), n_directions=2, steps=5, span=2.0)
    assert grid.shape == (2, 5, 4)
    np.testing.assert_allclose(grid[:, 2], np.tile(z.mean(axis=0), (2, 1)), atol=1e-5)
    step = grid[0, 4] - grid[0, 0]  # 4 sd along PC1, the first axis
    assert abs(step[0]) == pytest.approx(4 * 3.0, rel=0.05) and np.all(np.abs(step[1:]) < 0.5)
    assert ratios[0] > ratios[1]


def test_mixed_bfloat16_keeps_losses_in_float32():
    config = vf.Config(latent_dim=4, precision="mixed_bfloat16", seed=0)
    vf.setup_devices(config)  # the policy is process-wide; conftest puts float32 back after the test
    vae = vf.build_vae(config)
    vae.steps_per_epoch = 235  # as fit sets it for 60000 images: beta stays that of epoch 1
    x = np.random.default_rng(0).random((32, 28, 28, 1)).astype(np.float32)
    batch = (x, (x, np.arange(32, dtype=np.int32) % 4))
    before = vae.compute_losses(x, x, batch[1][1])
    assert all(v.dtype == tf.float32 for v in before.values()), before
    step = tf.function(vae.train_step)
    logs = [step(batch) for _ in range(15)][-1]
    assert vae.decoder.layers[1].compute_dtype == "bfloat16"
    assert np.isfinite(float(logs["total_loss"])) and float(logs["total_loss"]) < float(before["total_loss"])


def test_the_generator_recovers_a_known_mixture_and_shuffles_its_samples():
    rng = np.random.default_rng(0)
    means = np.array([[-6.0, 0.0, 1.0], [0.0, 6.0, -1.0], [6.0, -3.0, 0.0]])
    scales = np.array([[0.5, 0.5, 0.5], [0.2, 1.0, 0.5], [1.0, 0.3, 0.3]])
    z = np.concatenate([m + s * rng.standard_normal((2000, 3)) for m, s in zip(means, scales)])
    density = vf.fit_generator(z, components=3, seed=1)
    order = np.argsort(density["means"][:, 0])
    np.testing.assert_allclose(density["means"][order], means, atol=0.05)
    np.testing.assert_allclose(density["weights"], [1 / 3] * 3, atol=0.01)
    # full covariances, each its component's: diagonal here, with the per-axis variances of the data
    np.testing.assert_allclose(np.diagonal(density["covariances"][order], axis1=1, axis2=2), scales ** 2, rtol=0.1)
    samples = vf.sample_mixture(density, 3000, np.random.default_rng(2))
    assert samples.shape == (3000, 3) and samples.dtype == np.float32
    nearest = np.argmin(((samples[:, None, :] - means[None]) ** 2).sum(axis=2), axis=1)
    assert len(set(nearest[:30].tolist())) == 3  # shuffled, not grouped by component
    np.testing.assert_allclose(np.bincount(nearest) / 3000, [1 / 3] * 3, atol=0.04)


def test_class_conditional_latents_land_in_their_class_as_many_as_asked():
    """Each class's samples come from its own mixture (a slip that pools the classes, or pairs a class with another's
    mixture, puts them elsewhere), counts[c] of class c, and the same seed draws the same latents."""
    rng = np.random.default_rng(3)
    centres = rng.normal(0, 10, (10, 4))
    labels = np.repeat(np.arange(10), 300)
    z = centres[labels] + rng.standard_normal((3000, 4)) * [1.0, 0.5, 0.5, 0.2]
    mixtures = vf.class_mixtures(z, labels, 2, seed=0)
    counts = np.arange(10) * 3 + 20
    latents, intended = vf.class_conditional_latents(mixtures, counts, seed=4)
    assert latents.shape == (counts.sum(), 4) and intended.tolist() == np.repeat(np.arange(10), counts).tolist()
    nearest = np.argmin(((latents[:, None, :] - centres[None]) ** 2).sum(axis=2), axis=1)
    assert np.mean(nearest == intended) > 0.99
    for c in (0, 7):  # each class's samples have that class's mean and spread
        np.testing.assert_allclose(latents[intended == c].mean(axis=0), z[labels == c].mean(axis=0), atol=0.35)
    np.testing.assert_array_equal(vf.class_conditional_latents(mixtures, counts, seed=4)[0], latents)
    assert not np.array_equal(vf.class_conditional_latents(mixtures, counts, seed=5)[0], latents)


def test_a_small_class_gets_one_component_per_latent_dim_plus_one_codes_and_a_single_code_none():
    """The rule of conditional_components' meaning, by hand: 4-d codes need 5 per component, so 23 codes get 4
    components of the 10 asked, 6 get 1, 3 get 1 (the floor), 1 gets no mixture (and no row in 12); the codes
    counted are those fitted: 200 codes of which size=30 are fitted get 6."""
    rng = np.random.default_rng(0)
    sizes = {0: 200, 1: 23, 2: 6, 3: 3, 4: 1}
    labels = np.concatenate([np.full(n, c) for c, n in sizes.items()])
    z = rng.normal(size=(len(labels), 4)) + labels[:, None] * 5.0
    mixtures = vf.class_mixtures(z, labels, 10, seed=0)
    assert {c: len(m["weights"]) for c, m in mixtures.items()} == {0: 10, 1: 4, 2: 1, 3: 1}
    assert len(vf.class_mixtures(z, labels, 10, seed=0, size=30)[0]["weights"]) == 6
    latents, intended = vf.class_conditional_latents(mixtures, [10] * 10, seed=1)
    assert intended.tolist() == np.repeat([0, 1, 2, 3], 10).tolist() and np.all(np.isfinite(latents))


def test_noise_robustness_has_one_row_per_method_and_sigma_and_direct_noisy_psnr():
    clean = np.random.default_rng(5).random((40, 28, 28, 1)).astype(np.float32) ** 2
    config = vf.Config(seed=9)
    table = vf.noise_robustness(lambda noisy: noisy, clean, config, sigmas=(0.1, 0.45), size=25)
    assert len(table) == 6 and set(table["method"]) == {"noisy input", "TV (Chambolle)", "VAE"}
    assert table.groupby(["sigma", "method"]).size().eq(1).all() and (table["n_images"] == 25).all()
    subset = clean[vf.seeded_subset(40, 25, vf.seed_for(config, "robustness_subset"))]
    for i, sigma in enumerate((0.1, 0.45)):
        noisy = np.clip(subset + sigma * np.random.default_rng(vf.seed_for(config, "robustness_noise") + i)
                        .standard_normal(subset.shape, dtype=np.float32), 0, 1)
        direct = np.mean(10 * np.log10(1.0 / np.mean((subset.astype(np.float64) - noisy) ** 2, axis=(1, 2, 3))))
        rows = table[table["sigma"] == sigma].set_index("method")
        assert rows.loc["noisy input", "psnr"] == pytest.approx(direct, abs=1e-6)
        assert rows.loc["VAE", "psnr"] == pytest.approx(direct, abs=1e-6)  # the identity "denoiser"


def test_robustness_summary_names_where_the_vae_stops_beating_tv():
    rows = [(0.1, "TV (Chambolle)", 25.0), (0.1, "VAE", 18.0), (0.45, "TV (Chambolle)", 14.0), (0.45, "VAE", 18.5),
            (0.8, "TV (Chambolle)", 11.0), (0.8, "VAE", 12.0)]
    table = pd.DataFrame([{"sigma": s, "method": m, "psnr": p, "ssim": p / 30} for s, m, p in rows])
    assert vf.robustness_summary(table) == [
        "PSNR: the VAE beats TV at sigma 0.45, 0.8 and stops beating it at sigma 0.1",
        "SSIM: the VAE beats TV at sigma 0.45, 0.8 and stops beating it at sigma 0.1",
    ]


# ---------------------------------------------------------------- the learned (mixture) prior


def test_monte_carlo_kl_to_a_standard_normal_mixture_equals_the_closed_form():
    rng = np.random.default_rng(0)
    z_mean = rng.normal(0, 1, (6, 3)).astype(np.float32)
    z_log_var = rng.normal(0, 0.5, (6, 3)).astype(np.float32)
    analytic = float(vf.kl_divergence(z_mean, z_log_var))
    draws = 40_000  # per posterior
    mean, log_var = np.repeat(z_mean, draws, axis=0), np.repeat(z_log_var, draws, axis=0)
    z = (mean + np.exp(0.5 * log_var) * rng.standard_normal(mean.shape)).astype(np.float32)
    for components in (1, 3):  # K identical standard-normal components are N(0, I) too
        prior = vf.MixturePrior(3, components)
        per_draw = (np.sum(vf.log_normal(z, mean, log_var).numpy(), axis=1) - prior.log_prob(z).numpy())
        estimate = float(vf.kl_monte_carlo(z, mean, log_var, prior.log_prob))
        assert estimate == pytest.approx(float(per_draw.mean()), rel=1e-5)
        assert abs(estimate - analytic) < 4 * per_draw.std() / np.sqrt(len(z)), (estimate, analytic)


def test_mixture_log_density_matches_scipy():
    from scipy.stats import multivariate_normal

    prior = vf.MixturePrior(2, 3)
    weights = np.array([0.5, 0.3, 0.2])
    means = np.array([[0.0, 1.0], [3.0, -1.0], [-2.0, 2.0]], np.float32)
    variances = np.array([[1.0, 0.5], [0.2, 2.0], [1.5, 1.5]], np.float32)
    prior.set_parameters(weights, means, variances)
    z = np.random.default_rng(1).normal(0, 2, (50, 2)).astype(np.float32)
    expected = np.log(sum(w * multivariate_normal(m, np.diag(v)).pdf(z) for w, m, v in zip(weights, means, variances)))
    np.testing.assert_allclose(prior.log_prob(z).numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(prior.parameters()["weights"], weights, rtol=1e-6)


def test_mixture_samples_follow_its_weights_and_components():
    parameters = {"weights": np.array([0.7, 0.2, 0.1]), "means": np.array([[0.0, 0.0], [20.0, 0.0], [40.0, 5.0]]),
                  "variances": np.array([[1.0, 1.0], [4.0, 0.25], [1.0, 9.0]])}
    z = vf.sample_mixture(parameters, 30_000, np.random.default_rng(2))
    component = np.argmin(np.abs(z[:, :1] - parameters["means"][:, 0]), axis=1)
    np.testing.assert_allclose(np.bincount(component) / len(z), parameters["weights"], atol=0.01)
    for k in range(3):
        np.testing.assert_allclose(z[component == k].mean(axis=0), parameters["means"][k], atol=0.1)
        np.testing.assert_allclose(z[component == k].var(axis=0), parameters["variances"][k], rtol=0.1)


def test_before_a_generator_is_fitted_the_samples_come_from_the_trained_prior():
    """VAE.sample_generator: from the prior, with the same seed, until analyse() fits the generator; then from the
    generator (a stand-in model: one component at (5, -5), nearly no spread)."""
    model = types.SimpleNamespace(generator=None, sample_prior=lambda n, seed: np.full((n, 2), float(seed)))
    np.testing.assert_array_equal(vf.VAE.sample_generator(model, 4, 7), np.full((4, 2), 7.0))
    model.generator = {"weights": np.ones(1), "means": np.array([[5.0, -5.0]]), "covariances": np.eye(2)[None] * 1e-8}
    np.testing.assert_allclose(vf.VAE.sample_generator(model, 4, 7), np.tile([5.0, -5.0], (4, 1)), atol=1e-3)


def test_the_saved_files_work_without_this_module(tmp_path):
    """encoder.keras and decoder.keras reproduce the model's outputs, and the notebook's snippet generates from
    decoder.keras and prior.npz, in an interpreter that never imports vae_fashion. prior.npz holds the generator
    (the mixture fitted to the codes after training) and the trained prior beside it."""
    vae = vf.build_vae(vf.Config(latent_dim=4, seed=0, prior="mixture", prior_components=3))
    codes = np.random.default_rng(3).normal(0, 1, (300, 4)) + np.repeat([[4, 0, 0, 0], [0, 0, 0, 0]], 150, 0)
    vae.prior.fit(codes, seed=0)
    vf.save_models(vae, tmp_path)  # no density fitted yet: the trained prior is the generator
    saved = np.load(tmp_path / "prior.npz")
    trained = vae.prior.parameters()
    np.testing.assert_allclose(np.diagonal(saved["covariances"], axis1=1, axis2=2), trained["variances"], rtol=1e-6)
    vae.generator = vf.fit_generator(codes, 2, seed=0)
    vf.save_models(vae, tmp_path)
    saved = np.load(tmp_path / "prior.npz")
    for name, value in vae.generator.items():
        np.testing.assert_allclose(saved[name], value, rtol=1e-6)
    for name, value in trained.items():
        np.testing.assert_allclose(saved[f"trained_{name}"], value, rtol=1e-6)
    # sample_generator() draws from the saved generator: its samples cluster at the two fitted means
    latents = vae.sample_generator(2000, seed=1)
    nearest = np.argmin(((latents[:, None] - saved["means"][None]) ** 2).sum(axis=2), axis=1)
    np.testing.assert_allclose(np.bincount(nearest) / 2000, saved["weights"], atol=0.03)
    x = np.random.default_rng(2).random((6, 28, 28, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    z_mean, _z_log_var = vae.encoder(x)
    expected = vae.decoder(z_mean).numpy()
    notebook_text = "\n".join(line[2:] for line in (ROOT / "vae_fashion.py").read_text().splitlines()
                              if line.startswith("# "))  # the markdown cells, as the notebook shows them
    snippet = next(block for block in (part.split("```")[0] for part in notebook_text.split("```python\n")[1:])
                   if "prior.npz" in block)
    assert "prior.npz" in snippet and "decoder.keras" in snippet
    code = (
        "import os, sys, numpy as np, keras\n"
        "os.chdir(sys.argv[1])\n"
        "encoder, decoder = keras.models.load_model('encoder.keras'), keras.models.load_model('decoder.keras')\n"
        "z_mean, z_log_var = encoder.predict(np.load('x.npy'), verbose=0)\n"
        "np.save('z.npy', z_mean); np.save('out.npy', decoder.predict(z_mean, verbose=0))\n"
        f"{snippet}\n"
        "np.save('images.npy', images)\n"
        "assert 'vae_fashion' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=tmp_path, env=env, timeout=300)
    np.testing.assert_allclose(np.load(tmp_path / "z.npy"), z_mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5)
    images = np.load(tmp_path / "images.npy")
    assert images.shape[1:] == (28, 28, 1) and len(images) > 1 and 0 <= images.min() and images.max() <= 1


def test_mixture_samples_have_the_given_full_covariance():
    """Correlated components (the ex-post GMM, the class mixtures, a full-covariance prior): the sample covariance
    is the given one. A transposed Cholesky factor would give L^T L, far from L L^T here."""
    cov = np.array([[2.0, 1.2, -0.6], [1.2, 1.5, 0.3], [-0.6, 0.3, 0.8]])
    factor = np.linalg.cholesky(cov)
    assert np.abs(factor.T @ factor - cov).max() > 0.5  # the bug this test catches would be visible
    n = 200_000
    one = {"weights": np.array([1.0]), "means": np.array([[1.0, -2.0, 0.5]]), "covariances": cov[None]}
    z = vf.sample_mixture(one, n, np.random.default_rng(2))
    np.testing.assert_allclose(np.cov(z, rowvar=False), cov, atol=0.03)
    np.testing.assert_allclose(z.mean(axis=0), [1.0, -2.0, 0.5], atol=0.01)


def test_generation_quality_scores_each_set_against_the_test_images_and_the_test_labels(monkeypatch):
    """A stand-in model whose reconstructions are the clean test images themselves and whose decoder draws the
    mean training image of the class a latent points to: the reconstructions' Fréchet distance is 0, their
    agreement is the classifier's own test accuracy (so it counts against the test labels), and every decoded
    set lands on its class. The generator (sample_generator, stream prior_fd: only T-shirts here) and the trained
    prior (sample_prior, stream trained_prior_fd: every class) are scored under their own names;
    fd_training_codes decodes a seeded subset of the training codes; each class's conditional FD compares with
    that class's *test* images."""
    data, templates, codes = _bars_with_templates()
    drawn, decoded, calls = [], [], []

    def generate(latents):
        decoded.append(np.array(latents))
        return templates[np.argmax(latents, axis=1)]

    def only_class_0(n, seed):
        drawn.append(("generator", seed))
        return np.tile(np.eye(10)[0] * 3, (n, 1))

    def every_class(n, seed):
        drawn.append(("trained prior", seed))
        return np.eye(10)[np.random.default_rng(seed).integers(0, 10, n)] * 3

    frechet = vf.frechet_distance
    monkeypatch.setattr(vf, "frechet_distance", lambda a, b: calls.append((a, b)) or frechet(a, b))
    vae = types.SimpleNamespace(generate=generate, sample_generator=only_class_0, sample_prior=every_class)
    config = vf.Config(seed=0)
    result = vf.generation_quality(vae, data, config, codes, vf.class_mixtures(codes, data.y_train, 1, 0),
                                   data.x_test.copy())
    assert result["fd_samples"] == 200 and result["class_images"] == [20] * 10
    assert abs(result["fd_vae_reconstruction"]) < 1e-3, result
    assert result["reconstruction_agreement"] == pytest.approx(result["classifier_test_accuracy"])
    assert result["classifier_test_accuracy"] > 0.9
    assert result["conditional_agreement"] > 0.9 and result["fd_training_codes"] > result["fd_vae_reconstruction"]
    assert result["fd_clean_train"] < result["fd_noisy_input"]
    for c in range(10):
        assert result[f"conditional_agreement_{c}"] > 0.5, c

    assert ("generator", vf.seed_for(config, "prior_fd")) in drawn
    assert ("trained prior", vf.seed_for(config, "trained_prior_fd")) in drawn
    assert result["prior_class_counts"][0] == 200 and result["prior_class_entropy"] < 0.05
    assert result["trained_prior_class_entropy"] > 0.9
    assert result["fd_prior_samples"] > 2 * result["fd_trained_prior_samples"]
    subset = codes[vf.seeded_subset(600, 200, vf.seed_for(config, "training_codes"))]
    assert any(d.shape == subset.shape and np.array_equal(d, subset) for d in decoded)
    reference = calls[0][1]
    for i, (_mine, theirs) in enumerate(calls[-20:]):  # per class: its samples, then its reconstructions
        np.testing.assert_array_equal(theirs, reference[data.y_test[:200] == i // 2])


def _bars_with_templates(shift_test_labels: int = 0):
    x_train, y_train = synthetic_split(600, 0)
    x_test, y_test = synthetic_split(200, 1)
    clean_test = vf.to_unit_float(x_test)
    data = vf.FashionMNIST(vf.to_unit_float(x_train), y_train.astype(np.int32), clean_test,
                           ((y_test + shift_test_labels) % 10).astype(np.int32), "bars",
                           x_test_noisy=vf.add_noise(clean_test, 0.45, 0))
    templates = np.stack([data.x_train[data.y_train == c].mean(axis=0) for c in range(10)])
    codes = np.eye(10)[data.y_train] * 3 + np.random.default_rng(0).normal(0, 0.1, (600, 10))
    return data, templates, codes


def _template_decoder(templates, codes):
    """A stand-in model: a latent decodes to the template of its largest coordinate's class; both densities give
    the training codes."""
    return types.SimpleNamespace(generate=lambda latents: templates[np.argmax(latents, axis=1)],
                                 sample_generator=lambda n, seed: codes[:n], sample_prior=lambda n, seed: codes[:n])


def test_the_fd_classifier_learns_from_the_training_images_not_the_test_images():
    """METRICS: the small CNN trains "3 epochs on clean training images". With every test label shifted by one
    class, a classifier trained on the training images scores near 0 on the test set (and the reconstructions'
    agreement with it too); one trained on the test images would score near 1."""
    data, templates, codes = _bars_with_templates(shift_test_labels=1)
    vae = _template_decoder(templates, codes)
    result = vf.generation_quality(vae, data, vf.Config(seed=0), codes, vf.class_mixtures(codes, data.y_train, 1, 0),
                                   data.x_test.copy())
    assert result["classifier_test_accuracy"] < 0.2 and result["reconstruction_agreement"] < 0.2


def test_a_class_s_frechet_distances_need_two_images_of_it_and_the_scoring_prints_nothing(capsys):
    """A covariance needs two feature vectors: a class with one test image among the n scored (0 here) has NaN
    per-class distances, one with two (1) has finite ones; a class the training set lacks (3) has no class
    mixture, so no conditional samples: its conditional distance is NaN while its reconstructions' is finite.
    The classifier's training (two epochs: Keras prints "Epoch 1/2" for any verbose but 0), evaluation and passes
    print nothing into the notebook."""
    data, templates, codes = _bars_with_templates()
    kept = data.y_train != 3
    y_test = np.full(200, 5, np.int32)
    y_test[[0, 1, 2, 7]], y_test[3:30] = [0, 1, 1, 6], 3
    data = vf.FashionMNIST(data.x_train[kept], data.y_train[kept], data.x_test, y_test, "bars",
                           x_test_noisy=data.x_test_noisy)
    codes = codes[kept]
    vae = _template_decoder(templates, codes)
    capsys.readouterr()
    result = vf.generation_quality(vae, data, vf.Config(seed=0), codes,
                                   vf.class_mixtures(codes, data.y_train, 1, 0), data.x_test.copy(), epochs=2)
    assert capsys.readouterr().out == ""
    assert np.isnan(result["fd_conditional_0"]) and np.isnan(result["fd_reconstruction_0"])
    assert np.isfinite(result["fd_conditional_1"]) and np.isfinite(result["fd_reconstruction_1"])
    assert np.isnan(result["fd_conditional_3"]) and np.isfinite(result["fd_reconstruction_3"])
    assert np.isnan(result["conditional_agreement_3"]) and result["class_images"][3] == 27
