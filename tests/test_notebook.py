"""The generated notebook: in sync with the script, and runs end to end."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import types
import zipfile

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

import vae_fashion as vf
from conftest import ROOT, TINY_RUN, write_dataset

jupytext = pytest.importorskip("jupytext")
sys.path.insert(0, str(ROOT / "tools"))
import sync_docs  # noqa: E402

# Every file a finished default run writes, from the one table of outputs (checkpoint/ is a folder).
OUTPUT_FILES = vf.output_files()  # the default writes prior.npz: its generator is fitted after training
DRAWN_FILES = {name for output in vf.OUTPUTS if output.draw is not None for name in output.files}


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


def test_the_settings_and_outputs_tables_are_made_from_their_declarations():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for table in (sync_docs.settings_table(), sync_docs.outputs_table()):
        assert table in readme, "stale table: run `python3 tools/sync_docs.py`"
    # both names of a setting, as a user types them
    assert "`epochs` **17**: training epochs;" in readme and "`fresh` **0**: 1: discard a checkpoint" in readme
    assert "faithful: supcon_scale none, gamma_sc 1.0, fresh_noise 0," in readme and "quality: epochs 40," in readme
    assert "| `05_denoising_grid.png` |" in readme


def test_importing_the_module_does_not_train(tmp_path):
    """Importing runs no stage and makes no folder (a run prints "[load] started" before anything else)."""
    code = "import vae_fashion\nprint('imported', vae_fashion.run.__name__)"
    env = {**os.environ, "VAE_OUT_DIR": str(tmp_path / "out"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path, timeout=300,
                            capture_output=True, text=True)
    assert result.stdout.splitlines() == ["imported run"]
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
    env = {**os.environ, **TINY_RUN, "VAE_DATA_DIR": str(data), "VAE_OUT_DIR": str(out), "VAE_EPOCHS": "3",
           "VAE_TEST_SAMPLES": "150", "VAE_EMBED_SAMPLES": "120", "VAE_CLASSICAL_SAMPLES": "1000",
           "VAE_GEN_METRICS": "1", "VAE_SEED": "3"}
    command = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
               "--ExecutePreprocessor.timeout=900", "--output", "executed.ipynb", "vae_fashion.ipynb"]
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return work, out


def test_notebook_writes_every_output_with_valid_content(executed_run):
    work, out = executed_run
    for name in OUTPUT_FILES:
        assert (out / name).is_file(), f"missing {name}"
    assert {path.name for path in out.glob("*.png")} == DRAWN_FILES  # render() draws OUTPUTS' figures, no others
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
    for name in ("noisy_psnr", "vae_psnr", "vae_psnr_pooled", "vae_ssim", "psnr_gain_db", "clean_input_psnr",
                 "linear_probe_accuracy", "knn10_accuracy", "silhouette", "tv_chambolle_psnr", "nl_means_psnr",
                 "fd_vae_reconstruction", "fd_prior_samples", "fd_trained_prior_samples", "fd_training_codes",
                 "conditional_agreement"):
        assert name in metrics.index, name  # the names README and metrics.txt use
    value = metrics["value"]
    assert (metrics.loc["vae_psnr", "n_images"], metrics.loc["noisy_psnr", "n_images"]) == (150, 150)
    # noise 0.45 on these images gives a PSNR near 10 dB (whether the model denoises: test_numerics, test_real_data)
    assert 8 < value["noisy_psnr"] < 13
    assert metrics.loc["fd_prior_samples", "n_images"] == 150
    assert metrics.loc["tv_chambolle_psnr", "n_images"] == 150  # min(VAE_CLASSICAL_SAMPLES, test images)
    assert value["noisy_subset_psnr"] == pytest.approx(value["noisy_psnr"])  # the subset is the whole test set here
    assert value["tv_chambolle_psnr"] > value["noisy_subset_psnr"]
    assert metrics.loc["conditional_agreement_3", "n_images"] == 15
    robustness = pd.read_csv(out / "noise_robustness.csv")
    assert len(robustness) == 18 and (robustness["n_images"] == 150).all()

    report = (out / "metrics.txt").read_text(encoding="utf-8")  # every figure: test_report_promises
    for name in ("vae_psnr", "noisy_ssim", "tv_chambolle_psnr"):
        shown = next(line.split() for line in report.splitlines() if line.split()[:1] == [name])
        assert float(shown[1]) == pytest.approx(value[name], rel=1e-5) and shown[-1] == "150", name
    assert "512 training and 150 test images" in report and "noise robustness (noise_robustness.csv" in report

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
    # executed headless, Keras prints one line per epoch (progress_verbosity), not a live bar's updates
    assert "\r" not in text and "\b" not in text and text.count("Epoch 2/3") == 1
    images = sum("image/png" in o.get("data", {}) for c in notebook["cells"] for o in c.get("outputs", []))
    assert images >= 12


def test_the_live_progress_bar_only_where_a_person_watches(monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    assert vf.progress_verbosity() == 2  # a log file or CI: one line per epoch
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert vf.progress_verbosity("/usr/bin/python3 /usr/local/bin/jupyter-lab --port 8888") == 1  # Jupyter, Kaggle
    for headless in ("python3 -m jupyter nbconvert --execute vae_fashion.ipynb", "papermill in.ipynb out.ipynb"):
        assert vf.progress_verbosity(headless) == 2
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")  # Kaggle's "Save & Run All"
    assert vf.progress_verbosity("/opt/conda/bin/jupyter-notebook") == 2
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert vf.progress_verbosity() == 1  # a terminal


def test_in_a_kernel_given_no_command_the_progress_bar_follows_its_parent_process(monkeypatch):
    """The command that started the kernel is read from /proc: its parent's command line."""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    headless, lab = subprocess.Popen([*sleep, "jupyter", "nbconvert"]), subprocess.Popen([*sleep, "jupyter-lab"])
    try:
        monkeypatch.setattr(os, "getppid", lambda: headless.pid)
        assert vf.progress_verbosity() == 2
        monkeypatch.setattr(os, "getppid", lambda: lab.pid)
        assert vf.progress_verbosity() == 1
    finally:
        for process in (headless, lab):
            process.kill()
            process.wait()
    assert vf.progress_verbosity() == 1  # the parent is gone: unreadable, so taken as a person watching


def test_readme_results_are_the_committed_runs_of_the_current_settings():
    """README's results table is made from docs/runs/*/ (a cell changed by hand fails), and every committed run
    was made with the settings its recorded variables give today (a run of changed defaults fails)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert sync_docs.results_table() in readme, "stale results table: run `python3 tools/sync_docs.py`"
    for folder in sync_docs.RUNS:
        record = sync_docs.committed_run(folder)["config"]
        variables = {k: v for k, v in record["environment_variables"].items() if v is not None}
        today = dataclasses.asdict(vf.config_from_env(variables, {}))
        ran = {k: v for k, v in record["config"].items() if k not in ("out_dir", "data_dir")}
        assert ran == {k: today[k] for k in ran}, folder
        assert record["config"]["train_samples"] is None and record["config"]["test_samples"] is None, folder


def test_sync_docs_rewrites_every_table_of_a_stale_readme_and_the_notebook(tmp_path, monkeypatch):
    """From a README whose three tables are stale, tools/sync_docs.py writes the committed README back, and a
    notebook with the committed notebook's cells; a failed regeneration is not silent."""
    readme, notebook = (ROOT / "README.md").read_text(encoding="utf-8"), ROOT / "vae_fashion.ipynb"
    stale = re.sub(r"(<!-- (settings|outputs) table -->\n)(?:.+\n)+", r"\1| stale |\n", readme)
    stale = re.sub(r"(<!-- results table -->\n).*?(<!-- /results table -->)", r"\1| stale |\n\2", stale, flags=re.S)
    assert stale.count("| stale |") == 3
    results = sync_docs.results_table()  # from the committed runs, before ROOT moves
    monkeypatch.setattr(sync_docs, "README_TABLES", {**sync_docs.README_TABLES, "results": lambda: results})
    monkeypatch.setattr(sync_docs, "ROOT", tmp_path)
    (tmp_path / "README.md").write_text(stale, encoding="utf-8")
    shutil.copy(ROOT / "vae_fashion.py", tmp_path)
    sync_docs.main()
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == readme
    cells = [[cell.cell_type, cell.source] for cell in jupytext.read(tmp_path / "vae_fashion.ipynb").cells]
    assert cells == [[cell.cell_type, cell.source] for cell in jupytext.read(notebook).cells]
    (tmp_path / "vae_fashion.py").unlink()
    with pytest.raises(subprocess.CalledProcessError):
        sync_docs.main()
    (tmp_path / "README.md").write_text(stale.replace("<!-- outputs table -->", ""), encoding="utf-8")
    with pytest.raises(SystemExit, match="no '<!-- outputs table -->' line to put the outputs table after"):
        sync_docs.main()


def test_readme_is_a_product_page_of_at_most_170_lines():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 170
