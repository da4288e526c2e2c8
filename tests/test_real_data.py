"""A reduced run on the real Fashion-MNIST (Debian package dataset-fashion-mnist)."""

import pytest

import vae_fashion as vf

pytestmark = pytest.mark.skipif(
    not all(vf.idx_files_in(vf.DEBIAN_DATA_DIR).values()),
    reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


def test_reduced_run_on_real_data_clearly_beats_the_noisy_input():
    config = vf.Config(epochs=4, warmup_epochs=2, train_samples=20000, test_samples=2000,
                       data_dir=str(vf.DEBIAN_DATA_DIR))
    data = vf.load_fashion_mnist(config)
    assert data.x_train.shape == (20000, 28, 28, 1) and sorted(set(data.y_test.tolist())) == list(range(10))
    data = vf.with_noise(data, config)
    vae = vf.build_vae(config, len(data.x_train))
    history = vf.train_vae(vae, data.x_train_noisy, data.x_train, data.y_train, config, verbose=0)
    assert history["total_loss"].iloc[-1] < history["total_loss"].iloc[0]
    evaluated = vf.evaluate(vae, data, config)
    s = vf.denoising_summary(evaluated["quality"])
    # The noisy input is about 9.95 dB / 0.33 SSIM on the real test set.
    assert 9.5 < s["noisy_psnr"] < 10.5 and 0.28 < s["noisy_ssim"] < 0.38
    assert s["psnr_gain_db"] > 5.0, s
    assert s["ssim_gain"] > 0.15, s
    assert s["mse_improvement_pct"] > 60, s
    assert evaluated["representation"]["linear_probe_accuracy"] > 0.6

    density = vf.fit_expost_density(evaluated["z_mean_train"], config.seed)
    generation = vf.generation_quality(vae, data, config, evaluated["z_mean_train"], evaluated["denoised"], density)
    assert generation["classifier_test_accuracy"] > 0.8, generation
    assert generation["fd_samples"] == 2000
    # floor < reconstructions < noisy input; prior samples are reported, and lie above the floor
    assert generation["fd_clean_train"] < generation["fd_vae_reconstruction"] < generation["fd_noisy_input"], generation
    assert generation["fd_prior_samples"] > generation["fd_clean_train"], generation
    assert 0 < generation["prior_class_entropy"] <= 1 and 0.1 < generation["prior_mean_confidence"] <= 1
    assert generation["fd_expost_samples"] > generation["fd_clean_train"] and 0 < generation["expost_class_entropy"] <= 1
    assert 0.3 < generation["conditional_agreement"] <= 1 and 0.3 < generation["reconstruction_agreement"] <= 1
