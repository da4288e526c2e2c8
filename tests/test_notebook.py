"""The generated notebook: in sync with the script, and runs end to end."""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

import vae_fashion as vf
from conftest import ROOT, write_dataset

jupytext = pytest.importorskip("jupytext")

# Every file a finished run writes (besides config.json, run_status.json, timings.csv and checkpoint/).
OUTPUT_FILES = [
    "01_train_total_loss.png", "02_train_recon_loss.png", "03_train_kl_loss.png", "03B_train_supcon_loss.png",
    "04_beta_warmup.png", "05_denoising_grid.png", "06A_latent_pca_numbers.png", "06B_latent_pca_text_tr.png",
    "06C_latent_umap_text_tr.png", "06D_latent_tsne_text_tr.png", "07_generated_prior.png",
    "08_latent_interpolation.png", "09_generation_quality.png", "10_per_class_denoising.png",
    "11_latent_traversal.png", "A_title_denoising.png", "B_title_representation_learning.png",
    "C_title_generation.png", "D_title_interpolation.png", "history.csv", "metrics.csv", "metrics.txt",
    "pca_explained_variance.txt", "encoder.keras", "decoder.keras",
    "07B_generated_expost.png", "12_class_conditional.png", "13_noise_robustness.png", "noise_robustness.csv",
]


def _cells(notebook):
    return [(cell["cell_type"], "".join(cell["source"])) for cell in notebook["cells"]]


def test_notebook_matches_the_script():
    expected = jupytext.read(ROOT / "vae_fashion.py")
    committed = json.loads((ROOT / "vae_fashion.ipynb").read_text(encoding="utf-8"))
    assert _cells(committed) == [(c.cell_type, c.source) for c in expected.cells], (
        "vae_fashion.ipynb is out of date: run `jupytext --to ipynb vae_fashion.py`"
    )
    code_cells = [c for c in committed["cells"] if c["cell_type"] == "code"]
    assert len(code_cells) == 1, "the notebook must stay a single code cell"
    assert committed["metadata"]["kernelspec"]["name"] == "python3"


def test_the_notebook_settings_table_is_the_declared_settings():
    first_markdown = jupytext.read(ROOT / "vae_fashion.py").cells[0].source
    assert vf.settings_table() in first_markdown, "regenerate the table with vf.settings_table()"


def test_importing_the_module_does_not_train(tmp_path):
    code = "import vae_fashion, sys; sys.exit(0 if 'vae_fashion' in sys.modules else 1)"
    env = {**os.environ, "VAE_OUT_DIR": str(tmp_path / "out"), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path, timeout=300)
    assert not (tmp_path / "out").exists() and not (tmp_path / "vae_outputs_v3").exists()


def _check_png(path):
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, path.name
    assert float(image[..., :3].std()) > 0.01, f"{path.name} looks blank"


@pytest.fixture(scope="module")
def executed_run(tmp_path_factory):
    """Execute vae_fashion.ipynb with nbconvert on a tiny synthetic dataset."""
    work = tmp_path_factory.mktemp("nb")
    data = write_dataset(work / "data", n_train=600, n_test=200, gz=True)
    out = work / "out"
    shutil.copy(ROOT / "vae_fashion.ipynb", work / "vae_fashion.ipynb")
    env = {
        **os.environ,
        "VAE_DATA_DIR": str(data), "VAE_OUT_DIR": str(out), "VAE_EPOCHS": "3", "VAE_WARMUP_EPOCHS": "2",
        "VAE_BATCH_SIZE": "64", "VAE_TRAIN_SAMPLES": "512", "VAE_TEST_SAMPLES": "150",
        "VAE_EMBED_SAMPLES": "120", "VAE_SEED": "3",
    }
    command = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
               "--ExecutePreprocessor.timeout=900", "--output", "executed.ipynb", "vae_fashion.ipynb"]
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return work, out


def test_notebook_writes_every_output_with_valid_content(executed_run):
    work, out = executed_run
    for name in OUTPUT_FILES:
        assert (out / name).is_file(), f"missing {name}"
    for name in OUTPUT_FILES:
        if name.endswith(".png"):
            _check_png(out / name)
    for name in ("A_title_denoising.png", "D_title_interpolation.png"):
        assert mpimg.imread(out / name).shape[:2] == (864, 1536), name  # the whole 16:9 canvas, not cropped
    for name in ("encoder.keras", "decoder.keras"):
        assert zipfile.is_zipfile(out / name), name

    history = pd.read_csv(out / "history.csv")
    assert list(history.columns) == vf.HISTORY_COLUMNS
    assert history["epoch"].tolist() == [1, 2, 3]
    np.testing.assert_allclose(history["beta"], [0.5, 1.0, 1.0])
    assert np.all(np.isfinite(history.to_numpy()))
    assert history["recon_loss"].iloc[-1] < history["recon_loss"].iloc[0]

    metrics = pd.read_csv(out / "metrics.csv").set_index("name")
    assert list(metrics.index) == (
        list(vf.METRICS)
    )
    value = metrics["value"]
    assert (metrics.loc["vae_psnr", "n_images"], metrics.loc["noisy_psnr", "n_images"]) == (150, 150)
    for prefix in ("noisy", "vae"):
        assert 0 < value[f"{prefix}_mse"] < 1
        assert 5 < value[f"{prefix}_psnr"] < 60
        assert -1 <= value[f"{prefix}_ssim"] <= 1
    assert value["psnr_gain_db"] == pytest.approx(value["vae_psnr"] - value["noisy_psnr"])
    assert value["mse_improvement_pct"] == pytest.approx(100 * (1 - value["vae_mse"] / value["noisy_mse"]))
    # noise 0.45 on these images gives a PSNR near 10 dB
    assert 8 < value["noisy_psnr"] < 13
    for name in ("linear_probe_accuracy", "knn10_accuracy"):
        assert 0 <= value[name] <= 1
    assert -1 <= value["silhouette"] <= 1
    assert 0 <= value["classifier_test_accuracy"] <= 1 and 0 <= value["prior_class_entropy"] <= 1
    assert value["fd_clean_train"] >= 0 and value["fd_noisy_input"] > value["fd_clean_train"]
    assert metrics.loc["fd_prior_samples", "n_images"] == 150
    assert metrics.loc["tv_chambolle_psnr", "n_images"] == 150  # min(VAE_CLASSICAL_SAMPLES, test images)
    assert value["noisy_subset_psnr"] == pytest.approx(value["noisy_psnr"])  # the subset is the whole test set here
    assert value["tv_chambolle_psnr"] > value["noisy_subset_psnr"]
    assert "Training-free references on a seeded subset of 150 test images" in (out / "metrics.txt").read_text()
    assert value["fd_expost_samples"] > 0 and 0 <= value["conditional_agreement"] <= 1
    assert 0 <= value["expost_class_entropy"] <= 1 and metrics.loc["conditional_agreement_3", "n_images"] == 15
    robustness = pd.read_csv(out / "noise_robustness.csv")
    assert len(robustness) == 18 and (robustness["n_images"] == 150).all()
    assert "Noise robustness on a fixed seeded subset of 150 test images" in (out / "metrics.txt").read_text()

    report = (out / "metrics.txt").read_text(encoding="utf-8")
    assert f"{value['vae_psnr']:.2f}" in report and f"{value['noisy_ssim']:.4f}" in report
    assert "data_range=1" in report and "decoder(z_mean)" in report
    assert "150 test images" in report

    ratios = [float(line.split()[1]) for line in (out / "pca_explained_variance.txt").read_text().splitlines()
              if re.match(r"PC\d+ ", line)]
    assert len(ratios) == 16 and sum(ratios) == pytest.approx(1.0, abs=1e-3)
    assert ratios == sorted(ratios, reverse=True)

    config = json.loads((out / "config.json").read_text())
    assert config["config"]["epochs"] == 3 and config["config"]["data_dir"] == str(work / "data")
    status = json.loads((out / "run_status.json").read_text())
    assert status["status"] == "finished"
    timings = pd.read_csv(out / "timings.csv")
    assert {"load", "train", "evaluate", "t-SNE", "UMAP", "report", "total"} <= set(timings["stage"])


def test_executed_notebook_lists_the_output_folder(executed_run):
    work, out = executed_run
    notebook = json.loads((work / "executed.ipynb").read_text(encoding="utf-8"))
    text = "".join(
        "".join(o.get("text", "")) for c in notebook["cells"] if c["cell_type"] == "code" for o in c["outputs"]
    )
    assert f"Contents of {out}" in text
    assert "[train] done in" in text and "Epoch 3/3" in text
    images = sum("image/png" in o.get("data", {}) for c in notebook["cells"] for o in c.get("outputs", []))
    assert images >= 12
