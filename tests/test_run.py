"""Whole runs in one process under the settings that change what a run writes: the faithful preset with the
generation classifier, no generation classifier (gen_metrics 0), and no umap-learn."""

import json
import subprocess
import sys
import types

import pandas as pd
import pytest

import vae_fashion as vf
from conftest import TINY_RUN


def _config(dataset_dir, out, **environ):
    return vf.config_from_env({**TINY_RUN, "VAE_DATA_DIR": str(dataset_dir), "VAE_OUT_DIR": str(out), **environ}, {})


def test_one_epoch_of_the_faithful_preset_runs_the_original_model_and_the_generation_metrics(tmp_path, dataset_dir):
    environ = {**TINY_RUN, "VAE_DATA_DIR": str(dataset_dir), "VAE_OUT_DIR": str(tmp_path / "out"),
               "VAE_PRESET": "faithful", "VAE_EPOCHS": "1", "VAE_GEN_METRICS": "1"}
    metrics = vf.run(vf.config_from_env(environ, {}), environ=environ)
    out = tmp_path / "out"
    record = json.loads((out / "config.json").read_text())
    assert record["environment_variables"]["VAE_PRESET"] == "faithful"  # the mapping's, not os.environ's
    assert record["dtype_policy"] == "float32" and record["config"]["output_layer"] == "conv"
    assert (record["config"]["fresh_noise"], record["config"]["supcon_scale"], record["config"]["hidden_units"]) == (
        False, "none", 128)
    assert json.loads((out / "run_status.json").read_text())["status"] == "finished"
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1]
    assert {"vae_psnr", "classifier_test_accuracy", "fd_prior_samples", "conditional_agreement"} <= set(metrics["name"])
    assert "generation quality" in set(pd.read_csv(out / "timings.csv")["stage"])
    decoder = vf.keras.models.load_model(out / "decoder.keras")
    assert decoder.get_layer("logits").__class__.__name__ == "Conv2D"  # the 28x28 output layer, not the pixel shuffle


def test_without_umap_and_the_classifier_every_other_output_is_written(tmp_path, dataset_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "umap", None)  # `import umap` raises ImportError

    def no_pip(*args, **kwargs):
        raise subprocess.CalledProcessError(1, args[0])

    monkeypatch.setattr(vf.subprocess, "run", no_pip)
    out = tmp_path / "out"
    metrics = vf.run(_config(dataset_dir, out, VAE_GEN_METRICS="0", VAE_EMBED_SAMPLES="60"))
    printed = capsys.readouterr()
    assert "WARNING: UMAP skipped: import umap failed" in printed.err
    report = (out / "metrics.txt").read_text()
    # what the notebook shows: the devices, the data, then metrics.txt, the stage timings and the files written
    assert "\n  devices: CPU:0; 1 replica(s); precision " in "\n" + printed.out
    assert f"  IDX files in {dataset_dir}: train (512, 28, 28, 1), test (100, 28, 28, 1)\n" in printed.out
    listing = f"\nContents of {out}:\n  "
    assert printed.out.index("\n" + report) < printed.out.index("Stage timings (s):\n") < printed.out.index(listing)
    timings = printed.out.split("Stage timings (s):\n", 1)[1].splitlines()
    assert timings[0].split()[0] == "stage" and timings[1].split()[0] == "load"  # timings.csv's rows, unnumbered
    assert (out / "config.json").read_text().startswith('{\n  "') and (out / "run_status.json").read_text(
        ).startswith('{\n  "status": "finished",\n  "')
    assert "06C_latent_umap_text_tr.png was not written: import umap failed" in report
    assert "pip install umap-learn failed (CalledProcessError)" in report
    missing = {"06C_latent_umap_text_tr.png", "09_generation_quality.png"}
    assert (out / "06D_latent_tsne_text_tr.png").is_file()  # t-SNE still drawn
    for output in vf.OUTPUTS:
        for name in output.files:
            if name not in missing | {"checkpoint/", "prior.npz"}:
                assert (out / name).is_file(), name
    assert not any((out / name).exists() for name in missing)
    assert not {"classifier_test_accuracy", "fd_prior_samples", "conditional_agreement"} & set(metrics["name"])
    assert "\ngeneration\n" not in report
    assert "generation quality" not in set(pd.read_csv(out / "timings.csv")["stage"])
    assert json.loads((out / "run_status.json").read_text())["warnings"] == [
        line[2:] for line in report.split("\nwarnings\n", 1)[1].splitlines()]


def test_a_missing_umap_is_installed_once_and_a_failed_install_is_reported(monkeypatch):
    installed = types.ModuleType("umap")
    monkeypatch.setitem(sys.modules, "umap", installed)
    monkeypatch.setattr(vf.subprocess, "run", lambda *args, **kwargs: pytest.fail("pip ran though umap imports"))
    assert vf.import_umap() == (installed, None)
    monkeypatch.setitem(sys.modules, "umap", None)
    calls = []

    def pip_installs(command, **kwargs):
        calls.append(command)
        assert kwargs == {"check": True, "timeout": 600, "capture_output": True}  # 10 minutes, nothing printed
        sys.modules["umap"] = types.ModuleType("umap")  # what a successful pip install makes importable

    monkeypatch.setattr(vf.subprocess, "run", pip_installs)
    module, reason = vf.import_umap()
    assert module is sys.modules["umap"] and reason is None
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", "umap-learn"]]

    sys.modules["umap"] = None

    def pip_exits_1(command, check=False, **kwargs):  # as subprocess.run does: an exception only when checked
        if check:
            raise subprocess.CalledProcessError(1, command)
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(vf.subprocess, "run", pip_exits_1)
    module, reason = vf.import_umap()
    assert module is None and reason.endswith("; pip install umap-learn failed (CalledProcessError)")

    def pip_times_out(*args, **kwargs):
        raise subprocess.TimeoutExpired("pip", 600)

    monkeypatch.setattr(vf.subprocess, "run", pip_times_out)
    module, reason = vf.import_umap()
    assert module is None and "import umap failed" in reason
    assert "pip install umap-learn failed (TimeoutExpired)" in reason
