"""The copy path: sections 1-4 of the cell, cut above the section-5 header as a reader copies them, run alone in a
fresh interpreter with README's snippet, train the VAE that run() trains with plain Keras on numpy arrays."""

import json
import re
import subprocess
import sys

import numpy as np

from conftest import ROOT, synthetic_split

SECTION_5 = "# =============================================================================\n# 5. Analysis"
DOWNLOAD = "(x, y), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()"


def sections_one_to_four() -> str:
    source = (ROOT / "vae_fashion.py").read_text(encoding="utf-8")
    assert source.count(SECTION_5) == 1
    return source[: source.index(SECTION_5)]


def readme_snippet() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.search(r"<!-- copy path -->\n```python\n(.*?)```", readme, re.S).group(1)


def config_learning_rate() -> float:
    import vae_fashion as vf

    return vf.Config().learning_rate


def test_sections_one_to_four_name_nothing_defined_below_them(tmp_path):
    """A name used in sections 1-4 but defined further down (the appendix) fails here, even in code the snippet
    does not reach."""
    cut = tmp_path / "cut.py"
    cut.write_text(sections_one_to_four(), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--isolated", "--select", "F821",
                             str(cut)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_the_cut_cell_trains_with_plain_fit_on_arrays(tmp_path):
    """README's snippet after the cut, in a fresh interpreter; bar images stand in for Keras' download (no
    network here). Three epochs of 2048 images at batch 128, as in README; then two
    epochs of 512 images at Keras' default batch of 32."""
    snippet = readme_snippet()
    assert DOWNLOAD in snippet
    x, y = synthetic_split(2048, 0)
    x_test, y_test = synthetic_split(64, 1)
    np.savez(tmp_path / "data.npz", x=x, y=y, x_test=x_test, y_test=y_test)
    arrays = "x, y, x_test, y_test = (np.load('data.npz')[k] for k in ('x', 'y', 'x_test', 'y_test'))"
    cell = (
        sections_one_to_four()
        + snippet.replace(DOWNLOAD, arrays)
        + "test_clean = to_unit_float(x_test[:16])\n"
        "test_noisy = add_noise(test_clean, config.noise_factor, seed=1)\n"
        "def psnr(images):\n"
        "    return float(np.mean(10 * np.log10(1 / np.mean((images - test_clean) ** 2, axis=(1, 2, 3)))))\n"
        "spread = float(np.ptp(vae.prior.means.numpy(), axis=0).max())\n"
        "lr = float(vae.optimizer.learning_rate)\n"
        "vae = build_vae(config)\n"
        "at_32 = vae.fit(noisy[:512], (clean[:512], labels[:512]), epochs=2, verbose=0).history\n"
        "import json\n"
        "print(json.dumps({'history': {k: [float(v) for v in vs] for k, vs in history.history.items()},\n"
        "                  'denoised': psnr(denoised), 'noisy': psnr(test_noisy), 'prior': vae.prior is not None,\n"
        "                  'spread': spread, 'lr': lr, 'beta_32': [float(b) for b in at_32['beta']],\n"
        "                  'lr_32': float(vae.optimizer.learning_rate)}))\n"
    )
    (tmp_path / "cell.py").write_text(cell, encoding="utf-8")
    result = subprocess.run([sys.executable, "cell.py"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    history = outcome["history"]
    assert set(history) == {"total_loss", "recon_loss", "kl_loss", "supcon_loss", "beta"}
    assert outcome["prior"]  # the default: the learned mixture
    # fitted before epoch 2 (FitPrior): its 10 components, all N(0, I) at the start, no longer share a mean
    assert outcome["spread"] > 0.1, outcome["spread"]
    # beta warms up by the epochs fit runs: beta_max * epoch / warmup_epochs, above 0 from the first epoch, at
    # batch 128 and at Keras' default of 32; the cosine schedule ends both fits at 5 % of the learning rate
    np.testing.assert_allclose(history["beta"], [1 / 8, 2 / 8, 3 / 8], rtol=1e-6)
    np.testing.assert_allclose(outcome["beta_32"], [1 / 8, 2 / 8], rtol=1e-6)
    np.testing.assert_allclose([outcome["lr"], outcome["lr_32"]], 0.05 * config_learning_rate(), rtol=1e-4)
    assert all(np.isfinite(values).all() for values in history.values())
    assert history["recon_loss"][-1] < 0.9 * history["recon_loss"][0]
    # the full objective: SupCon scaled to gamma_sc = 0.25 of the BCE term (supcon_weight; SupCon is above 1 nat
    # here), so each step's total is 1.25 BCE + beta KL, and so is the mean over an epoch's steps (up to float32
    # sums of about 1e-4)
    recon, beta, kl = (np.array(history[name]) for name in ("recon_loss", "beta", "kl_loss"))
    assert min(history["supcon_loss"]) > 1.0 and min(kl) > 0.0
    np.testing.assert_allclose(np.array(history["total_loss"]) - 1.25 * recon, beta * kl, rtol=0.1, atol=1e-3)
    assert outcome["denoised"] > outcome["noisy"] + 1.0, outcome


def test_the_copied_model_data_and_training_stay_at_most_412_lines():
    """Issue 38: sections 2-4, banner to banner, are what a reader copies and reads first; they stay small."""
    cut = sections_one_to_four()
    section_2 = cut.index("# =============================================================================\n# 2. Model")
    assert len(cut[section_2:].splitlines()) <= 412
