"""Derived figures (issue 40): a figure whose definition names other figures (a gain, a ratio, a reference, "as X,
for Y") is checked on data that tells it apart from every sibling a one-line slip could compute it from: per-image
errors that vary (so the per-image and pooled PSNRs differ), distinct images (so a subset differs from the first
images), reconstructions that are not the test images, sample sets the classifier sees differently."""

import types

import numpy as np
import pandas as pd
import pytest
from skimage.metrics import structural_similarity
from skimage.restoration import denoise_tv_chambolle

import vae_fashion as vf
from conftest import synthetic_split


def _psnr(clean, images):
    """Per-image PSNR (data range 1) from its definition."""
    mse = np.mean((clean.astype(np.float64) - images.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(1 / mse)


def _ssim(clean, images):
    return np.array([structural_similarity(a[..., 0].astype(np.float64), b[..., 0].astype(np.float64),
                                           data_range=1.0) for a, b in zip(clean, images)])


def _images_with_varying_errors():
    """Distinct clean images and three outputs whose per-image errors vary: the noisy input, the VAE's, and the
    VAE on clean inputs, each with its own spread of noise levels."""
    rng = np.random.default_rng(3)
    clean = rng.random((30, 28, 28, 1)).astype(np.float32) ** 2
    outputs = {}
    for method, low, high in (("noisy", 0.2, 0.6), ("vae", 0.02, 0.2), ("clean_input", 0.01, 0.05)):
        sigma = np.linspace(low, high, 30, dtype=np.float32)[:, None, None, None]
        outputs[method] = np.clip(clean + sigma * rng.standard_normal(clean.shape, dtype=np.float32), 0, 1)
    return clean, outputs


def test_the_denoising_gains_are_of_the_per_image_means_on_images_whose_errors_vary():
    """mse_improvement_pct = 100 (1 - vae_mse / noisy_mse), psnr_gain_db = vae_psnr - noisy_psnr, ssim_gain =
    vae_ssim - noisy_ssim: per-image means of the VAE and of the noisy input, not the pooled PSNRs nor the
    clean-input reference."""
    clean, outputs = _images_with_varying_errors()
    summary = vf.denoising_summary({method: vf.image_quality(clean, images) for method, images in outputs.items()})
    mse = {m: np.mean((clean.astype(np.float64) - x) ** 2) for m, x in outputs.items()}
    psnr = {m: _psnr(clean, x).mean() for m, x in outputs.items()}
    pooled = {m: 10 * np.log10(1 / mse[m]) for m in outputs}
    ssim = {m: _ssim(clean, x).mean() for m, x in outputs.items()}
    assert summary["mse_improvement_pct"] == pytest.approx(100 * (1 - mse["vae"] / mse["noisy"]), rel=1e-9)
    assert summary["psnr_gain_db"] == pytest.approx(psnr["vae"] - psnr["noisy"], abs=1e-9)
    assert summary["ssim_gain"] == pytest.approx(ssim["vae"] - ssim["noisy"], abs=1e-9)
    # the data separates every sibling: pooled from per-image PSNRs, the VAE from the clean-input reference
    for m in outputs:
        assert abs(psnr[m] - pooled[m]) > 0.1 and summary[f"{m}_psnr_pooled"] == pytest.approx(pooled[m], abs=1e-9)
    assert abs(psnr["clean_input"] - psnr["vae"]) > 1 and abs(ssim["clean_input"] - ssim["vae"]) > 0.05


def test_the_classical_references_score_the_seeded_subset_of_distinct_images():
    """Every classical figure is of the same seeded subset of clean images (not the first ones), with the TV
    reference's own weight, and counts the images it scored, not the ones asked for."""
    rng = np.random.default_rng(4)
    clean = rng.random((60, 28, 28, 1)).astype(np.float32) ** 2
    noisy = vf.add_noise(clean, 0.3, seed=1)
    denoised = np.clip(clean + np.linspace(0.01, 0.2, 60, dtype=np.float32)[:, None, None, None]
                       * rng.standard_normal(clean.shape, dtype=np.float32), 0, 1)
    config = vf.Config(classical_samples=25, noise_factor=0.3, seed=3)
    result = vf.classical_references(clean, noisy, denoised, config)
    subset = vf.seeded_subset(60, 25, vf.seed_for(config, "classical_subset"))
    tv = np.stack([denoise_tv_chambolle(x[..., 0].astype(np.float64), weight=vf.TV_WEIGHT)
                   for x in noisy[subset]])[..., None]
    first = clean[: len(subset)]
    for method, images in (("tv_chambolle", tv), ("vae_subset", denoised[subset]), ("noisy_subset", noisy[subset])):
        assert result[f"{method}_psnr"] == pytest.approx(_psnr(clean[subset], images).mean(), abs=1e-6), method
        assert result[f"{method}_ssim"] == pytest.approx(_ssim(clean[subset], images).mean(), abs=1e-6), method
        assert abs(_psnr(first, images).mean() - result[f"{method}_psnr"]) > 0.5  # the first images differ
    assert result["classical_samples"] == 25
    assert vf.classical_references(clean, noisy, denoised, vf.Config(classical_samples=100))["classical_samples"] == 60
    z = rng.normal(size=(40, 3))
    assert vf.representation_quality(z, np.arange(40) % 4, z, np.arange(40) % 4, 0, 100)["silhouette_samples"] == 40


def test_generation_figures_match_the_classifier_on_their_own_image_sets(monkeypatch):
    """With the FD classifier in hand, each generation figure is recomputed from its own images: reconstructions
    that are not the test images (so their agreement differs from the classifier's accuracy), class-conditional
    samples of class 3 that look like class 4 (so class 3's agreement and FD differ from the others' and from the
    overall figure), and a generator and a trained prior whose samples the classifier sees differently. Classes 5
    and 6 have fewer test images than the rest: each class gets as many samples as it has test images."""
    x_train, y_train = synthetic_split(600, 0)
    x_test, y_test = synthetic_split(230, 1)
    few = np.isin(y_test, (5, 6)) & (np.cumsum(np.isin(y_test, (5, 6))) > 16)  # keep 8 of each: 200 images
    x_test, y_test = x_test[~few], y_test[~few]
    clean_test = vf.to_unit_float(x_test)
    data = vf.FashionMNIST(vf.to_unit_float(x_train), y_train.astype(np.int32), clean_test, y_test.astype(np.int32),
                           "bars", x_test_noisy=vf.add_noise(clean_test, 0.45, 0))
    templates = np.stack([data.x_train[data.y_train == c].mean(axis=0) for c in range(10)])
    looks_like = np.where(data.y_train == 3, 4, data.y_train)  # class 3's codes decode to class 4's template
    codes = np.eye(10)[looks_like] * 3 + np.random.default_rng(0).normal(0, 0.1, (600, 10))

    def generate(latents):
        return templates[np.argmax(latents, axis=1)]

    vae = types.SimpleNamespace(
        generate=generate,
        sample_generator=lambda n, seed: np.eye(10)[np.arange(n) % 2] * 3,  # T-shirts and trousers
        sample_prior=lambda n, seed: np.eye(10)[np.random.default_rng(seed).integers(0, 10, n)] * 3)
    built = []
    real_build = vf.build_classifier
    monkeypatch.setattr(vf, "build_classifier", lambda seed: built.append(real_build(seed)) or built[-1])
    config = vf.Config(seed=0)
    reconstructions = np.roll(data.x_test, 1, axis=0)  # each "reconstruction" is the previous test image
    mixtures = vf.class_mixtures(codes, data.y_train, 2, seed=0)
    result = vf.generation_quality(vae, data, config, codes, mixtures, reconstructions)

    classifier = built[0]
    features = vf.keras.Model(classifier.input, classifier.get_layer("features").output)
    n = 200

    def probs(images):
        return classifier.predict(images[:n], verbose=0)

    def fd(images, reference_images):
        return vf.frechet_distance(features.predict(images, verbose=0), features.predict(reference_images, verbose=0))

    y = data.y_test[:n]
    assert result["class_images"] == np.bincount(y, minlength=10).tolist() and result["class_images"][5] < 20
    assert result["classifier_test_accuracy"] == pytest.approx(np.mean(probs(data.x_test).argmax(1) == y), abs=1e-6)
    agreement = np.mean(probs(reconstructions).argmax(1) == y)
    assert result["reconstruction_agreement"] == pytest.approx(agreement, abs=1e-6)
    assert result["classifier_test_accuracy"] - agreement > 0.5  # the data separates the two
    latents, intended = vf.class_conditional_latents(mixtures, np.bincount(y, minlength=10),
                                                     vf.seed_for(config, "conditional"))
    predicted = classifier.predict(generate(latents), verbose=0).argmax(1)
    per_class_agreement = [np.mean(predicted[intended == c] == c) for c in range(10)]
    for c in range(10):
        assert result[f"conditional_agreement_{c}"] == pytest.approx(per_class_agreement[c], abs=1e-9), c
        assert result[f"fd_conditional_{c}"] == pytest.approx(
            fd(generate(latents[intended == c]), data.x_test[:n][y == c]), rel=1e-3), c
        assert result[f"fd_reconstruction_{c}"] == pytest.approx(
            fd(reconstructions[:n][y == c], data.x_test[:n][y == c]), rel=1e-3), c
        assert abs(result[f"fd_reconstruction_{c}"] - result[f"fd_conditional_{c}"]) > 1e-3, c
    assert per_class_agreement[3] < 0.2 < result["conditional_agreement"] - 0.5  # class 3 differs from the whole
    assert result["fd_conditional_3"] > 2 * max(result[f"fd_conditional_{c}"] for c in (0, 1, 2))
    assert result["conditional_agreement"] == pytest.approx(np.mean(predicted == intended), abs=1e-9)
    generator, trained = generate(vae.sample_generator(n, 0)), generate(vae.sample_prior(
        n, vf.seed_for(config, "trained_prior_fd")))
    for name, images in (("prior", generator), ("trained_prior", trained)):
        p = probs(images)
        assert result[f"{name}_mean_confidence"] == pytest.approx(p.max(1).mean(), abs=1e-5), name
        counts = np.bincount(p.argmax(1), minlength=10) / n
        entropy = -np.sum(counts[counts > 0] * np.log(counts[counts > 0])) / np.log(10)
        assert result[f"{name}_class_entropy"] == pytest.approx(entropy, abs=1e-9), name
    assert abs(result["prior_mean_confidence"] - result["trained_prior_mean_confidence"]) > 1e-4
    assert result["fd_clean_train"] == pytest.approx(fd(data.x_train[:n], data.x_test[:n]), rel=1e-3)
    assert result["fd_clean_train"] > 0.05
    assert result["fd_conditional_samples"] == pytest.approx(fd(generate(latents), data.x_test[:n]), rel=1e-3)


def test_noise_robustness_scores_each_method_on_its_own_output_and_each_verdict_from_its_own_column():
    """The TV rows are TV's output, the VAE rows the given denoiser's (neither the noisy input nor each other's),
    and the SSIM verdict reads the SSIM column, on a table where PSNR and SSIM rank the methods differently."""
    clean = np.random.default_rng(5).random((30, 28, 28, 1)).astype(np.float32) ** 2
    config = vf.Config(seed=9)

    def blur(noisy):  # a stand-in VAE unlike both the noisy input and TV
        return (noisy + np.roll(noisy, 1, axis=1) + np.roll(noisy, 1, axis=2)) / 3

    table = vf.noise_robustness(blur, clean, config, sigmas=(0.2,), size=20).set_index("method")
    subset = clean[vf.seeded_subset(30, 20, vf.seed_for(config, "robustness_subset"))]
    noisy = vf.add_noise(subset, 0.2, vf.seed_for(config, "robustness_noise"))
    tv = np.stack([denoise_tv_chambolle(x[..., 0].astype(np.float64), weight=vf.TV_WEIGHT) for x in noisy])[..., None]
    for method, images in (("noisy input", noisy), ("TV (Chambolle)", tv), ("VAE", blur(noisy))):
        assert table.loc[method, "psnr"] == pytest.approx(_psnr(subset, images).mean(), abs=1e-6), method
        assert table.loc[method, "ssim"] == pytest.approx(_ssim(subset, images).mean(), abs=1e-6), method
    assert len({round(v, 3) for v in table["psnr"]}) == 3  # three different outputs

    rows = [(0.1, "TV (Chambolle)", 25.0, 0.5), (0.1, "VAE", 18.0, 0.7), (0.45, "TV (Chambolle)", 14.0, 0.6),
            (0.45, "VAE", 18.5, 0.4)]
    ranked_apart = pd.DataFrame([{"sigma": s, "method": m, "psnr": p, "ssim": q} for s, m, p, q in rows])
    assert vf.robustness_summary(ranked_apart) == [
        "PSNR: the VAE beats TV at sigma 0.45 and stops beating it at sigma 0.1",
        "SSIM: the VAE beats TV at sigma 0.1 and stops beating it at sigma 0.45",
    ]


