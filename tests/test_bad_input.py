"""Bad input: a clear error naming the file or setting, and no folder that passes for a finished run."""

import json
import os
import re
import types

import numpy as np
import pytest

import vae_fashion as vf
from conftest import IDX_NAMES, ROOT, TINY_RUN, idx_bytes, saved_weights, start_run, write_dataset, write_idx


def _cli(monkeypatch, capsys, env):
    for name in list(os.environ):
        if name.startswith("VAE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = vf.cli()
    return code, capsys.readouterr().err


def _assert_not_a_finished_run(out):
    assert not (out / "metrics.csv").exists() and not (out / "metrics.txt").exists()
    if (out / "run_status.json").exists():
        assert json.loads((out / "run_status.json").read_text())["status"] == "failed"


def _break_dataset(kind, folder):
    """Apply one of the bad-input cases to a good synthetic dataset folder."""
    path = {k: folder / v for k, v in IDX_NAMES.items()}
    if kind == "missing file":
        path["test_labels"].unlink()
    elif kind == "wrong magic":
        path["train_labels"].write_bytes(path["train_images"].read_bytes())
    elif kind == "truncated":
        path["test_images"].write_bytes(path["test_images"].read_bytes()[:-100])
    elif kind == "trailing bytes":
        path["train_labels"].write_bytes(path["train_labels"].read_bytes() + b"\x00\x00")
    elif kind == "not 28x28":
        write_idx(path["test_images"], np.zeros((200, 27, 27), np.uint8))
    elif kind == "count mismatch":
        write_idx(path["test_labels"], np.zeros(150, np.uint8))
    elif kind == "label range":
        write_idx(path["train_labels"], np.full(600, 10, np.uint8))
    return folder


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing file", "missing t10k-labels-idx1-ubyte"),
        ("wrong magic", "train-labels-idx1-ubyte: magic number 0x00000803 says 3 dimension"),
        ("truncated", "t10k-images-idx3-ubyte: truncated"),
        ("trailing bytes", "train-labels-idx1-ubyte: has trailing bytes"),
        ("not 28x28", "t10k-images-idx3-ubyte: images are \\(27, 27\\)"),
        ("count mismatch", "t10k-labels-idx1-ubyte holds 150 labels but .* holds 200 images"),
        ("label range", "train-labels-idx1-ubyte: label 10 at index 0 is outside 0-9"),
    ],
)
def test_bad_dataset_fails_clearly_and_leaves_no_results(tmp_path, monkeypatch, capsys, kind, message):
    data = _break_dataset(kind, write_dataset(tmp_path / "data"))
    out = tmp_path / "out"
    code, err = _cli(monkeypatch, capsys, {**TINY_RUN, "VAE_DATA_DIR": str(data), "VAE_OUT_DIR": str(out)})
    assert code == 1
    assert re.search(message, err), err
    _assert_not_a_finished_run(out)
    assert json.loads((out / "run_status.json").read_text())["status"] == "failed"


def test_missing_data_folder(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, err = _cli(monkeypatch, capsys, {"VAE_DATA_DIR": str(tmp_path / "nowhere"), "VAE_OUT_DIR": str(out)})
    assert code == 1 and f"VAE_DATA_DIR='{tmp_path / 'nowhere'}' is not a folder" in err
    _assert_not_a_finished_run(out)


def test_malformed_csv(tmp_path, monkeypatch, capsys):
    data = tmp_path / "csv"
    data.mkdir()
    for name in vf.CSV_FILES.values():
        (data / name).write_text("label,pixel1\n1,2\n")
    out = tmp_path / "out"
    code, err = _cli(monkeypatch, capsys, {"VAE_DATA_DIR": str(data), "VAE_OUT_DIR": str(out)})
    assert code == 1 and "fashion-mnist_train.csv: has 1 rows x 2 columns" in err
    _assert_not_a_finished_run(out)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"VAE_EPOCHS": "abc"}, "VAE_EPOCHS='abc' is not a whole number"),
        ({"VAE_EPOCHS": "0"}, "VAE_EPOCHS='0' is out of range"),
        ({"VAE_NOISE_FACTOR": "-1"}, "VAE_NOISE_FACTOR='-1' is out of range"),
        ({"VAE_FRESH": "yes"}, "VAE_FRESH='yes' must be 0 or 1"),
    ],
)
def test_bad_settings_stop_before_any_work(tmp_path, monkeypatch, capsys, env, message):
    out = tmp_path / "out"
    code, err = _cli(monkeypatch, capsys, {**env, "VAE_OUT_DIR": str(out)})
    assert code == 2 and message in err
    assert not out.exists()


def test_sample_count_larger_than_dataset(tmp_path, monkeypatch, capsys, dataset_dir):
    out = tmp_path / "out"
    code, err = _cli(monkeypatch, capsys,
                     {"VAE_DATA_DIR": str(dataset_dir), "VAE_OUT_DIR": str(out), "VAE_TRAIN_SAMPLES": "70000"})
    assert code == 2 and "VAE_TRAIN_SAMPLES=70000 is larger than the 600 images available" in err
    _assert_not_a_finished_run(out)


def test_unwritable_output_folder(tmp_path, monkeypatch, capsys, dataset_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = _cli(monkeypatch, capsys, {"VAE_DATA_DIR": str(dataset_dir), "VAE_OUT_DIR": str(blocker / "out")})
    assert code == 1 and f"output folder {blocker / 'out'} is not writable (Not a directory); set VAE_OUT_DIR" in err


def test_the_output_folder_is_made_with_its_parents_and_holds_no_probe_and_no_earlier_output(tmp_path):
    out = vf.prepare_output_dir(tmp_path / "a" / "b")
    assert out.is_dir() and list(out.iterdir()) == []
    (out / "metrics.csv").write_text("an earlier run's")
    assert vf.prepare_output_dir(str(out)) == out and list(out.iterdir()) == []  # the folder given as text


def test_a_write_that_fails_leaves_neither_the_file_nor_its_temporary(tmp_path):
    target = str(tmp_path / "metrics.csv")  # given as text
    with pytest.raises(RuntimeError, match="crash"), vf.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with vf.atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert [(p.name, p.read_text()) for p in tmp_path.iterdir()] == [("metrics.csv", "whole")]


def test_an_output_folder_nobody_may_write_is_refused_also_as_root(monkeypatch, capsys, dataset_dir):
    """/proc refuses new folders to root too (CI runs as root, where folder permissions do not hold)."""
    code, err = _cli(monkeypatch, capsys, {"VAE_DATA_DIR": str(dataset_dir), "VAE_OUT_DIR": "/proc/self/vae-out"})
    assert code == 1 and "output folder /proc/self/vae-out is not writable" in err


@pytest.mark.parametrize("env, code, message", [
    ({"VAE_EPOCHS": "abc"}, 2, "ERROR: VAE_EPOCHS='abc' is not a whole number"),
    ({"VAE_DATA_DIR": "/nowhere"}, 1, "ERROR: VAE_DATA_DIR='/nowhere' is not a folder"),
])
def test_the_script_exits_with_2_for_a_bad_setting_and_1_for_bad_input(tmp_path, env, code, message):
    process = start_run({**env, "VAE_OUT_DIR": str(tmp_path / "out")}, cwd=tmp_path)
    log = process.communicate(timeout=300)[0]
    assert process.returncode == code and message in log, log[-2000:]
    _assert_not_a_finished_run(tmp_path / "out")


def _message(action) -> str:
    """What `action` raises or prints to stderr."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            action()
    except vf.VAEFashionError as error:
        return str(error)
    return err.getvalue()


def _troubleshooting_cases(tmp_path, monkeypatch):
    """README's Troubleshooting messages -> the call that makes the code say it."""
    images, labels = np.zeros((10000, 28, 28), np.uint8), np.zeros(10000, np.uint8)
    folder = write_dataset(tmp_path / "data")
    (folder / IDX_NAMES["test_labels"]).unlink()
    bad_labels = labels.copy()
    bad_labels[7] = 12
    narrow, text = tmp_path / "narrow" / "fashion-mnist_train.csv", tmp_path / "text" / "fashion-mnist_train.csv"
    for path in (narrow, text):
        path.parent.mkdir()
    narrow.write_text("label,pixel1\n1,2\n")
    text.write_text("label," + ",".join(f"p{i}" for i in range(784)) + "\n1," + ",".join(["x"] * 784) + "\n")
    vf.open_checkpoint(tmp_path / "ckpt", vf.Config(epochs=20))
    z = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    monkeypatch.setattr(vf, "import_umap", lambda: (None, "import umap failed (no module)"))

    def diverge():  # what train_vae raises from what StopOnNonFinite saw
        guard = vf.StopOnNonFinite()
        guard.set_model(types.SimpleNamespace(stop_training=False))
        guard.on_epoch_begin(2)
        guard.on_train_batch_end(17, {"kl_loss": float("nan")})
        raise vf.TrainingDivergedError(vf.diverged_message(*guard.failure))

    return {
        "Fashion-MNIST was not found. Searched, in order: …":
            lambda: vf.find_and_load_raw(search_dirs=[], download=None),
        "VAE_DATA_DIR='…' is not a folder": lambda: vf.find_and_load_raw("/nowhere"),
        "…: missing t10k-labels-idx1-ubyte …": lambda: vf.load_idx_folder(folder),
        "…: bad magic number …": lambda: vf.parse_idx(b"\x01\x02\x03\x04" + bytes(8)),
        "…: truncated: …": lambda: vf.parse_idx(idx_bytes(np.zeros((2, 28, 28)))[:-5]),
        "…: images are (32, 32) but …": lambda: vf.validated_split(np.zeros((3, 32, 32)), np.zeros(3), "x", "y"),
        "… holds 9999 labels but … 10000 images": lambda: vf.validated_split(images, labels[:9999], "x", "y"),
        "…: label 12 at index 7 is outside 0-9": lambda: vf.validated_split(images, bad_labels, "x", "y"),
        "…fashion-mnist_train.csv: has … rows x … columns": lambda: vf.read_fashion_csv(narrow),
        "…fashion-mnist_train.csv: holds non-integer or empty cells": lambda: vf.read_fashion_csv(text),
        "VAE_EPOCHS='abc' is not a whole number": lambda: vf.config_from_env({"VAE_EPOCHS": "abc"}),
        "OVERRIDES['epochs']='0' is out of range": lambda: vf.config_from_env({}, {"epochs": 0}),
        "the environment names unknown setting(s) VAE_EPOCH (did you mean VAE_EPOCHS?)": lambda: vf.config_from_env(
            {"VAE_EPOCH": "5"}),
        "VAE_TRAIN_SAMPLES=70000 is larger than the 60000 images available": lambda: vf.take_first(
            np.zeros(60000), 70000, "VAE_TRAIN_SAMPLES"),
        "output folder … is not writable": lambda: vf.prepare_output_dir("/proc/self/vae-out"),
        "training stopped: kl_loss became nan in epoch 3, batch 17": diverge,
        "… holds a training checkpoint made with other settings (epochs: stored 20 vs now 30)":
            lambda: vf.open_checkpoint(tmp_path / "ckpt", vf.Config(epochs=30)),
        "VAE_BATCH_SIZE=255 does not split evenly over 2 replicas":
            lambda: vf.batches_per_epoch(1000, vf.Config(batch_size=255), 2),
        "WARNING: UMAP skipped: …": lambda: vf.latent_embeddings(z, vf.Config(embed_samples=60), vf.StageTimer().stage),
    }


def test_readme_troubleshooting_messages_are_the_ones_the_code_prints(tmp_path, monkeypatch, capsys):
    """Every message in README's Troubleshooting table is what the code says for such a case: the README
    text, with each '…' standing for any text, begins the code's message (the file's path before it)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    first_cells = [row.split(" | ")[0] for row in table.splitlines() if row.startswith("| `")]
    documented = [message for cell in first_cells for message in re.findall(r"`([^`]+)`", cell)]
    cases = _troubleshooting_cases(tmp_path, monkeypatch)
    assert sorted(documented) == sorted(cases), set(documented) ^ set(cases)
    for text, action in cases.items():
        said = _message(action)
        pattern = r"\s*.*\s*".join(re.escape(part) for part in re.split(r"\s*…\s*", text))
        assert re.search(pattern, said, flags=re.S), f"README says {text!r}; the code says {said!r}"


def test_nan_loss_fails_the_run_naming_the_term(tmp_path, monkeypatch, capsys, dataset_dir):
    real_load = vf.load_fashion_mnist

    def poisoned(config, **search):
        data = real_load(config, **search)
        data.x_train[5, 3, 3, 0] = np.nan
        return data

    monkeypatch.setattr(vf, "load_fashion_mnist", poisoned)
    out = tmp_path / "out"
    code, err = _cli(monkeypatch, capsys, {**TINY_RUN, "VAE_DATA_DIR": str(dataset_dir), "VAE_OUT_DIR": str(out)})
    assert code == 1 and "training stopped: recon_loss became nan in epoch 1" in err
    _assert_not_a_finished_run(out)
    assert not (out / "checkpoint" / "vae.weights.h5").exists()


def test_stale_results_of_an_earlier_run_are_removed(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.csv").write_text("old")
    (out / "metrics.txt").write_text("old")
    code, _err = _cli(monkeypatch, capsys, {"VAE_DATA_DIR": str(tmp_path / "none"), "VAE_OUT_DIR": str(out)})
    assert code == 1
    _assert_not_a_finished_run(out)


def _checkpoint_holds_only_finite_epochs(out):
    """No epoch after a NaN or infinite loss: state.json's rows and every backed-up weight are finite, and no
    finished training is saved."""
    checkpoint = vf.Checkpoint(out / "checkpoint")
    rows = checkpoint.history()
    assert all(np.isfinite(value) for row in rows for value in row.values()), rows
    assert not checkpoint.weights.exists()
    for path in checkpoint.root.glob("epoch-*.weights.h5"):
        assert int(path.name[6:10]) <= len(rows), path.name  # no backup of an epoch state.json does not list
        assert all(np.isfinite(array).all() for array in saved_weights(path).values()), path.name
    return rows


def test_a_diverged_run_backs_up_no_nan_epoch_and_its_rerun_does_not_train_on_from_it(tmp_path, monkeypatch,
                                                                                        capsys, dataset_dir):
    """The reproduction of issue 40: a learning rate that makes training diverge in epoch 1, then the same command
    again. Keras calls on_epoch_end after a stop too; the NaN epoch must not be backed up as finished."""
    out = tmp_path / "out"
    env = {**TINY_RUN, "VAE_LEARNING_RATE": "10", "VAE_EPOCHS": "3", "VAE_DATA_DIR": str(dataset_dir),
           "VAE_OUT_DIR": str(out)}
    for _attempt in range(2):
        code, err = _cli(monkeypatch, capsys, env)
        assert code == 1 and "training stopped:" in err and "in epoch 1," in err, err
        _assert_not_a_finished_run(out)
        assert _checkpoint_holds_only_finite_epochs(out) == []
    assert "resuming" not in capsys.readouterr().out


class DivergesInEpoch(vf.DistributedVAE):
    """A VAE whose logged losses become NaN from epoch `bad_epoch` (1-based) on, or, with weights_only, whose
    weights become NaN in that epoch's last step while every logged loss stays finite."""

    bad_epoch, weights_only = 0, False

    def train_step(self, batch):
        logs = super().train_step(batch)
        epoch, step = batch["step_key"][0] // vf.STEP_KEY_STRIDE, batch["step_key"][0] % vf.STEP_KEY_STRIDE
        bad = vf.ops.greater_equal(epoch, self.bad_epoch - 1)
        if self.weights_only:
            kernel = self.decoder.trainable_weights[0]
            last_step = vf.ops.logical_and(vf.ops.equal(epoch, self.bad_epoch - 1),
                                           vf.ops.equal(step, self.steps_per_epoch - 1))
            kernel.assign(vf.ops.where(last_step, kernel * np.nan, kernel))
            return logs
        return {name: vf.ops.where(bad, np.nan, value) if name != "beta" else value for name, value in logs.items()}


@pytest.mark.parametrize("bad_epoch, weights_only", [(2, False), (3, False), (2, True)])
def test_a_run_that_diverges_later_keeps_the_finite_epochs_and_resumes_from_them(tmp_path, dataset_dir, capsys,
                                                                                 bad_epoch, weights_only):
    """Divergence in a middle or the last epoch, by the loss or only by the weights: the checkpoint keeps the
    epochs before it, saves no finished training, and the same settings resume from the last finite epoch."""
    config = vf.Config(epochs=3, warmup_epochs=1, batch_size=64, latent_dim=4, train_samples=256,
                       data_dir=str(dataset_dir), seed=3)
    data = vf.load_fashion_mnist(config)
    noisy = vf.add_noise(data.x_train, config.noise_factor, config.seed)
    checkpoint = vf.open_checkpoint(tmp_path, config)
    DivergesInEpoch.bad_epoch, DivergesInEpoch.weights_only = bad_epoch, weights_only
    vae = vf.build_vae(config, model_class=DivergesInEpoch)
    message = "a weight became nan" if weights_only else "became nan"
    with pytest.raises(vf.TrainingDivergedError, match=f"{message} in epoch {bad_epoch}, batch"):
        vf.train_vae(vae, noisy, data.x_train, data.y_train, config, checkpoint, 0)
    rows = _checkpoint_holds_only_finite_epochs(tmp_path)
    assert [row["epoch"] for row in rows] == list(range(1, bad_epoch))
    capsys.readouterr()
    history = vf.train_vae(vf.build_distributed_vae(config), noisy, data.x_train, data.y_train, config,
                           vf.open_checkpoint(tmp_path, config), 0)
    assert f"resuming after epoch {bad_epoch - 1}" in capsys.readouterr().out
    assert history["epoch"].tolist() == [1, 2, 3] and np.isfinite(history.drop(columns="epoch").to_numpy()).all()


def test_a_checkpoint_that_holds_a_nan_epoch_is_not_resumed_from_it(tmp_path, dataset_dir):
    """A checkpoint written before this fix backed up the diverged epoch: its NaN row and weights are skipped."""
    config = vf.Config(epochs=2, warmup_epochs=1, batch_size=64, latent_dim=4, train_samples=128,
                       data_dir=str(dataset_dir), seed=3)
    checkpoint = vf.open_checkpoint(tmp_path, config)
    vae = vf.build_distributed_vae(config)
    for weight in vae.decoder.trainable_weights:
        weight.assign(weight * np.nan)
    checkpoint.save_epoch(vae, [{"epoch": 1, **dict.fromkeys(vf.LOSS_TERMS, float("nan")), "beta": 1.0}])
    fresh = vf.build_distributed_vae(config)
    assert checkpoint.restore(fresh) == []
    assert all(np.isfinite(w.numpy()).all() for w in fresh.weights)
