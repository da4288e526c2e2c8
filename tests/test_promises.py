"""Promises of the cell's docs that a one-line slip would break while a run still finishes with plausible
numbers: each is checked against a small independent reference or a property that separates it from its
nearest wrong version."""

import inspect
import types
import warnings

import numpy as np
import pytest
import tensorflow as tf

import vae_fashion as vf


def fit_begins(vae, steps: int, epochs: int) -> None:
    """What Keras' fit tells its callbacks before the first step: the steps of one epoch, and the epochs."""
    schedule = vf.FitSchedule()
    schedule.set_model(vae)
    schedule.set_params({"steps": steps, "epochs": epochs})
    schedule.on_train_begin()


def test_the_cosine_schedule_decays_to_5_percent_of_the_learning_rate_over_the_run():
    """Config's promise: "cosine: decay to 5 % over the run" (every epoch's steps, not one epoch's)."""
    config = vf.Config(epochs=4, batch_size=64, learning_rate=2e-3, latent_dim=4)
    vae = vf.build_vae(config)
    fit_begins(vae, steps=10, epochs=4)  # 600 images at batch 64: 40 steps in the run
    assert vae.steps_per_epoch == 10
    for step, expected in ((0, 2e-3), (10, 2e-3 * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi / 4)))),
                           (20, 2e-3 * (0.05 + 0.95 * 0.5)), (40, 1e-4), (60, 1e-4)):
        vae.optimizer.iterations.assign(step)
        assert float(vae.optimizer.learning_rate) == pytest.approx(expected, rel=1e-5), step
    constant = vf.build_vae(vf.dataclasses.replace(config, lr_schedule="constant"))
    fit_begins(constant, steps=10, epochs=4)
    constant.optimizer.iterations.assign(40)
    assert float(constant.optimizer.learning_rate) == pytest.approx(2e-3)


def test_fit_retraces_the_training_step_only_when_its_epoch_length_or_decay_changes():
    """A second fit of the same shape reuses the compiled step (bench_training times such fits)."""
    vae = vf.build_vae(vf.Config(latent_dim=4, epochs=2))
    vae.make_train_function()
    built = vae.train_function
    fit_begins(vae, steps=10, epochs=2)
    traced = vae.train_function
    assert traced is not built
    fit_begins(vae, steps=10, epochs=2)
    assert vae.train_function is traced
    fit_begins(vae, steps=12, epochs=2)
    assert vae.train_function is not traced and vae.schedule.decay_steps == 24
    traced = vae.train_function
    fit_begins(vae, steps=12, epochs=3)  # the same epoch length, a longer run: the decay is traced anew
    assert vae.train_function is not traced and vae.schedule.decay_steps == 36
    fit_begins(vae, steps=1, epochs=1)
    assert vae.schedule.decay_steps == 1
    with pytest.raises(ValueError, match="pass steps_per_epoch"):
        fit_begins(vae, steps=None, epochs=2)


def test_build_vae_seeds_the_weights_with_vae_seed_and_its_uses_print_nothing(capsys):
    first, again, other = (vf.build_vae(vf.Config(latent_dim=4, hidden_units=8, seed=seed)) for seed in (5, 5, 6))
    for a, b in zip(first.weights, again.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert any(not np.array_equal(a.numpy(), b.numpy()) for a, b in zip(first.weights, other.weights, strict=True))
    capsys.readouterr()
    first.generate(first.encode(np.zeros((3, 28, 28, 1), np.float32))[0])
    assert capsys.readouterr().out == ""  # no progress bar per call: the run's log stays readable


class _RecordingPrior:
    def __init__(self):
        self.calls, self.fitted = [], False

    def fit(self, latents, seed):
        self.calls.append((np.array(latents), seed))
        self.fitted = True


def test_building_the_vae_warns_of_nothing():
    """Every layer is built when the model is: Keras warns, of "failures down the line", about a model whose
    layer (the mixture prior, which no call builds) looks unbuilt."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vae = vf.build_vae(vf.Config(latent_dim=4, seed=0))
    assert vae.prior.built and not vae.prior.fitted  # fitted only by FitPrior, before epoch 2
    assert [str(w.message) for w in caught] == []


def test_the_mixture_prior_is_fitted_once_before_epoch_2_to_one_posterior_sample_of_each_noisy_image():
    """FitPrior: at the start of the second epoch only, to z_mean + sd * N(0, 1) of PRIOR_FIT_SAMPLES distinct
    seeded noisy training images (not to z_mean, not to the clean images, not with repeats)."""
    n = vf.PRIOR_FIT_SAMPLES + 2000
    noisy = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 28, 28, 1), np.float32)
    config = vf.Config(seed=3)
    model = types.SimpleNamespace(prior=_RecordingPrior(), encoded=[])

    def encode(images):  # the image's number as its z_mean in both dimensions, and a posterior sd of 0.5
        model.encoded.append(images[:, 0, 0, 0])
        return np.repeat(images[:, 0, 0, :], 2, axis=1), np.full((len(images), 2), np.log(0.25), np.float32)

    model.encode = encode
    callback = vf.FitPrior(noisy, config)
    callback.set_model(model)
    fits = []
    for epoch in (0, 1, 2, 3):  # epoch counts from 0, as Keras' on_epoch_begin gets it
        callback.on_epoch_begin(epoch)
        fits.append(len(model.prior.calls))
    assert fits == [0, 1, 1, 1] and len(model.encoded) == 1
    second = vf.FitPrior(noisy, config)  # a later fit's epoch 2 keeps the prior the model trained
    second.set_model(model)
    second.on_epoch_begin(1)
    assert len(model.prior.calls) == 1
    latents, seed = model.prior.calls[0]
    assert seed == vf.seed_for(config, "prior_fit") and latents.shape == (vf.PRIOR_FIT_SAMPLES, 2)
    images = model.encoded[0]
    assert len(np.unique(images)) == vf.PRIOR_FIT_SAMPLES  # distinct images, each once
    offsets = latents - images[:, None]  # the posterior sample's noise: N(0, 0.5^2), independent per dimension
    assert abs(offsets.std() - 0.5) < 0.02 and abs(offsets.mean()) < 0.02
    assert abs(np.corrcoef(offsets[:, 0], offsets[:, 1])[0, 1]) < 0.05


def test_plain_fit_fits_the_mixture_prior_to_the_noisy_array_it_trains_on(monkeypatch):
    """Sections 1-4 alone: vae.fit(noisy, (clean, labels)) adds FitPrior on `noisy`, which fits the prior by EM
    before epoch 2; a tf.data input without a FitPrior of the caller's is refused with what to pass instead. (A
    later fit keeping the fitted prior: the FitPrior test above.)"""
    config = vf.Config(latent_dim=4, hidden_units=8, encoder_depth=1, decoder_depth=1, prior_components=2, seed=3)
    vae = vf.build_vae(config, jit_compile=False)
    clean = np.random.default_rng(0).random((64, 28, 28, 1)).astype(np.float32)
    noisy, labels = vf.add_noise(clean, 0.45, 1), np.arange(64, dtype=np.int32) % 4
    dataset = tf.data.Dataset.from_tensor_slices((noisy, (clean, labels))).batch(32)
    with pytest.raises(ValueError, match="pass them to fit\\(\\) as an array"):
        vae.fit(dataset, epochs=1, verbose=0)
    made, init = [], vf.FitPrior.__init__
    monkeypatch.setattr(vf.FitPrior, "__init__", lambda self, images, config: made.append(images) or init(
        self, images, config))
    fits, fit = [], vae.prior.fit
    monkeypatch.setattr(vae.prior, "fit", lambda latents, seed: fit(latents, seed) or fits.append(
        (latents, seed, vae.prior.parameters())))
    vae.fit(dataset, epochs=1, verbose=0, callbacks=[vf.FitPrior(noisy, config)])  # the caller's own: no other
    assert len(made) == 1 and fits == []  # one epoch: not fitted yet
    vae.fit(noisy, (clean, labels), batch_size=32, epochs=2, verbose=0)
    assert len(made) == 2 and made[1] is noisy
    ((latents, seed, fitted),) = fits
    from sklearn.mixture import GaussianMixture

    reference = GaussianMixture(2, covariance_type="diag", random_state=seed).fit(latents)  # the prior's EM
    np.testing.assert_allclose(fitted["weights"], reference.weights_, rtol=1e-5)
    np.testing.assert_allclose(fitted["means"], reference.means_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fitted["variances"], reference.covariances_, rtol=1e-4)
    assert vae.prior.fitted


def test_after_its_fit_only_the_kl_term_trains_the_prior():
    vae = vf.build_vae(vf.Config(latent_dim=4, seed=0, prior_components=3))
    x = np.random.default_rng(0).random((16, 28, 28, 1)).astype(np.float32)
    labels = np.arange(16, dtype=np.int32) % 4
    prior_weights = [vae.prior.logits, vae.prior.means, vae.prior.log_vars]
    assert all(any(w is v for v in vae.trainable_weights) for w in prior_weights)
    with tf.GradientTape(persistent=True) as tape:
        losses = vae.compute_losses(x, x, labels, training=True)
    for term in ("recon_loss", "supcon_loss"):
        assert all(g is None for g in tape.gradient(losses[term], prior_weights)), term
    kl_gradients = tape.gradient(losses["kl_loss"], prior_weights)
    assert float(tf.linalg.global_norm([g for g in kl_gradients if g is not None])) > 0


def test_the_denoising_grid_rows_are_clean_noisy_denoised_with_one_column_per_class(monkeypatch):
    labels = np.array([3, 0, 3, 1, 0, 2, 1, 2, 2])
    x = np.arange(9, dtype=np.float32)[:, None, None, None] * np.ones((1, 28, 28, 1), np.float32)
    results = types.SimpleNamespace(y_test=labels, x_test=x, x_test_noisy=x + 100, denoised=x + 200)
    drawn = {}
    monkeypatch.setattr(vf, "plot_images", lambda images, title, path, rows, columns, show: drawn.update(
        images=images, rows=rows, columns=columns))
    vf.draw_denoising_grid(results, ["grid.png"])
    first_of_each_class = [1, 3, 5, 0]  # classes 0, 1, 2, 3 in order, the first test image of each
    np.testing.assert_array_equal(drawn["images"][:, :, 0, 0, 0],
                                  [first_of_each_class, np.add(first_of_each_class, 100),
                                   np.add(first_of_each_class, 200)])
    assert [row.split("\n")[0] for row in drawn["rows"]] == ["Clean", "Noisy", "Denoised"]
    assert drawn["columns"] == [vf.CLASS_NAMES_TR[c] for c in range(4)]


def test_the_scatter_plots_draw_their_points_in_one_seeded_random_order(monkeypatch, tmp_path):
    from matplotlib.axes import Axes

    drawn = []
    original = Axes.scatter
    monkeypatch.setattr(Axes, "scatter", lambda self, x, y, **kw: drawn.append(np.array(x)) or original(
        self, x, y, **kw))
    labels = np.repeat(np.arange(10), 30)  # sorted by class: drawn in this order, class 9 would hide the rest
    coords = np.stack([np.arange(300.0), np.zeros(300)], axis=1)
    vf.plot_latent_scatter(coords, labels, "t", tmp_path / "a.png", seed=7)
    np.testing.assert_array_equal(drawn[-1], np.random.default_rng(7).permutation(300))

    # every scatter of a run uses the one seeded order of the "scatter_order" stream
    seeds = []
    signature = inspect.signature(vf.plot_latent_scatter)
    monkeypatch.setattr(vf, "plot_latent_scatter", lambda *a, **k: seeds.append(
        signature.bind(*a, **k).arguments.get("seed")))
    config = vf.Config(seed=11)
    results = types.SimpleNamespace(config=config, pca_ratios=np.array([0.5, 0.3]), y_test=labels,
                                    pca_coords=coords, embeddings={"subset": np.arange(300), "t-SNE": coords,
                                                                   "UMAP": coords})
    vf.draw_pca(results, [tmp_path / "1.png", tmp_path / "2.png"])
    vf.draw_embeddings(results, [tmp_path / "3.png", tmp_path / "4.png"])
    assert seeds == [vf.seed_for(config, "scatter_order")] * 4


def test_the_linear_probe_and_knn_learn_on_training_codes_and_score_on_test_codes():
    """Test codes whose classes are the training codes' shifted by one: fitted on the training codes, every
    test image is misclassified; a probe fitted on the test codes would score 1."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (10, 3))
    y = np.repeat(np.arange(10), 50)
    z = centres[y] + rng.normal(0, 0.3, (500, 3))
    scores = vf.representation_quality(z, y, z, (y + 1) % 10, seed=0)
    assert scores["linear_probe_accuracy"] == 0.0 and scores["knn10_accuracy"] == 0.0
    assert vf.representation_quality(z, y, z, y, seed=0)["knn10_accuracy"] == 1.0


def test_the_interpolation_lines_join_test_images_of_two_different_classes_and_are_labelled_with_them():
    labels = np.repeat(np.arange(10), 20)
    pairs = vf.interpolation_pairs(labels, 8, seed=4)
    assert len(pairs) == 8 and len(set(pairs)) == 8
    assert all(labels[a] != labels[b] for a, b in pairs)
    z = np.eye(10, dtype=np.float32)[labels] * 3  # each class at its own corner
    vae = types.SimpleNamespace(generate=lambda latents: np.repeat(latents[:, :1, None, None], 28 * 28, axis=1)
                                .reshape(len(latents), 28, 28, 1))
    config = vf.Config(latent_dim=10, seed=4)
    paths = vf.latent_paths(vae, z, labels, vf.PCA().fit(z), config)
    chosen = vf.interpolation_pairs(labels, 8, vf.seed_for(config, "interpolation_pairs"))
    assert paths["interpolation_labels"] == [f"{vf.CLASS_NAMES_TR[labels[a]]} →\n{vf.CLASS_NAMES_TR[labels[b]]}"
                                             for a, b in chosen]
    # each line starts at its first image's code and ends at its second's (coordinate 0: 3 for class 0, else 0)
    for line, (a, b) in zip(paths["interpolation"], chosen):
        assert line[0, 0, 0, 0] == z[a, 0] and line[-1, 0, 0, 0] == z[b, 0]
    assert paths["interpolation"].shape == (8, 10, 28, 28, 1) and paths["traversal"].shape == (5, 9, 28, 28, 1)
    # the traversal: mean + t * sd * PC_k for t from -2.5 to 2.5 in 9 steps (README's 11_latent_traversal.png)
    pca = vf.PCA().fit(z + np.random.default_rng(0).normal(0, 0.1, z.shape))
    grid, ratios = vf.latent_traversal(pca)
    sd = np.sqrt(pca.explained_variance_[:5])[:, None]
    for column, t in ((0, -2.5), (4, 0.0), (8, 2.5)):
        np.testing.assert_allclose(grid[:, column], pca.mean_ + t * sd * pca.components_[:5], atol=1e-5)
    np.testing.assert_array_equal(ratios, pca.explained_variance_ratio_[:5])


def test_interpolation_pairs_join_two_classes_present_and_refuse_a_test_set_of_one_class():
    """A small test set may lack classes: every pair still joins two different classes, among those present."""
    for labels in (np.repeat([3, 7], 4), np.repeat([3, 7, 8], 4)):
        for seed in range(20):
            pairs = vf.interpolation_pairs(labels, 8, seed)
            assert len(pairs) == 8 and all(labels[a] != labels[b] for a, b in pairs), (seed, pairs)
    assert {labels[a] for pair in vf.interpolation_pairs(labels, 8, 0) for a in pair} == {3, 7, 8}
    with pytest.raises(vf.DatasetError, match="the 20 test images hold only one class.*VAE_TEST_SAMPLES"):
        vf.interpolation_pairs(np.full(20, 5), 8, 0)


def test_the_supcon_term_uses_the_supcon_temperature_setting():
    """Config: supcon_temperature is SupCon's temperature (a slip that drops it trains at the default 0.1)."""
    vae = vf.build_vae(vf.Config(latent_dim=4, seed=0, supcon_temperature=0.5))
    x = np.random.default_rng(0).random((16, 28, 28, 1)).astype(np.float32)
    labels = np.arange(16, dtype=np.int32) % 4
    z_mean = vae.encode(x)[0]
    supcon = float(vae.compute_losses(x, x, labels)["supcon_loss"])
    assert supcon == pytest.approx(float(vf.supcon_loss(z_mean, labels, 0.5)), rel=1e-4)
    assert supcon != pytest.approx(float(vf.supcon_loss(z_mean, labels, 0.1)), rel=1e-2)
