"""Bad input, interruption and reruns: clear errors, nothing lost, nothing faked."""

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import vae_fashion as vf
from conftest import IDX_NAMES, saved_weights, start_run, write_dataset, write_idx

TINY = {"VAE_EPOCHS": "2", "VAE_BATCH_SIZE": "64", "VAE_TRAIN_SAMPLES": "256", "VAE_TEST_SAMPLES": "64",
        "VAE_EMBED_SAMPLES": "60", "VAE_LATENT_DIM": "4"}


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
    import re

    data = _break_dataset(kind, write_dataset(tmp_path / "data"))
    out = tmp_path / "out"
    code, err = _cli(monkeypatch, capsys, {**TINY, "VAE_DATA_DIR": str(data), "VAE_OUT_DIR": str(out)})
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
    assert code == 1 and f"output folder {blocker / 'out'} is not writable" in err and "VAE_OUT_DIR" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_output_folder(tmp_path, monkeypatch, capsys, dataset_dir):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = _cli(monkeypatch, capsys, {"VAE_DATA_DIR": str(dataset_dir), "VAE_OUT_DIR": str(locked)})
    finally:
        locked.chmod(0o700)
    assert code == 1 and "is not writable" in err


def test_nan_loss_fails_the_run_naming_the_term(tmp_path, monkeypatch, capsys, dataset_dir):
    real_load = vf.load_fashion_mnist

    def poisoned(config, **search):
        data = real_load(config, **search)
        data.x_train[5, 3, 3, 0] = np.nan
        return data

    monkeypatch.setattr(vf, "load_fashion_mnist", poisoned)
    out = tmp_path / "out"
    code, err = _cli(monkeypatch, capsys, {**TINY, "VAE_DATA_DIR": str(dataset_dir), "VAE_OUT_DIR": str(out)})
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


# ------------------------------------------------------------------ resume and reruns


RESUME = {"VAE_EPOCHS": "4", "VAE_WARMUP_EPOCHS": "2", "VAE_BATCH_SIZE": "64", "VAE_TRAIN_SAMPLES": "512",
          "VAE_TEST_SAMPLES": "100", "VAE_EMBED_SAMPLES": "60", "VAE_SEED": "5"}


def _run_to_end(env, cwd):
    process = start_run(env, cwd=cwd)
    log = process.communicate(timeout=900)[0]
    assert process.returncode == 0, log[-3000:]
    return log


def _kill_at(env, cwd, epoch_line):
    """Start a run and SIGKILL it when it prints `epoch_line` (the start of that epoch)."""
    victim = start_run(env, cwd=cwd)
    seen = []
    deadline = time.time() + 600
    for line in victim.stdout:
        seen.append(line)
        if line.startswith(epoch_line):
            victim.send_signal(signal.SIGKILL)
            break
        assert time.time() < deadline, "".join(seen)[-3000:]
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    out = Path(env["VAE_OUT_DIR"])
    assert json.loads((out / "run_status.json").read_text())["status"] == "running"  # never 'finished'
    assert not (out / "metrics.csv").exists()


def _assert_same_run(out, reference):
    """Exactly equal: every printed digit of metrics.csv and history.csv, and every saved weight."""
    pd.testing.assert_frame_equal(pd.read_csv(out / "metrics.csv"), pd.read_csv(reference / "metrics.csv"))
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    pd.testing.assert_frame_equal(history, pd.read_csv(reference / "history.csv"))
    ours, theirs = (saved_weights(folder / "checkpoint" / "vae.weights.h5") for folder in (out, reference))
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    assert json.loads((out / "run_status.json").read_text())["status"] == "finished"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run that the interrupted ones are compared with."""
    root = tmp_path_factory.mktemp("resume")
    env = {**RESUME, "VAE_DATA_DIR": str(write_dataset(root / "data"))}
    _run_to_end({**env, "VAE_OUT_DIR": str(root / "ref")}, root)
    return env, root


def test_kill_mid_training_then_resume_equals_an_uninterrupted_run(uninterrupted):
    env, root = uninterrupted
    out = root / "killed"
    env = {**env, "VAE_OUT_DIR": str(out)}
    _kill_at(env, root, "Epoch 3/4")  # epochs 1-2 are done and backed up

    log = _run_to_end(env, root)
    assert "resuming after epoch 2" in log
    assert "Epoch 1/4" not in log and "Epoch 3/4" in log
    _assert_same_run(out, root / "ref")

    # A finished run is not trained again, and reports the same figures.
    log = _run_to_end(env, root)
    assert "training already finished" in log and "Epoch 1/4" not in log
    _assert_same_run(out, root / "ref")


def test_damaged_newest_backup_resumes_from_the_previous_copy(uninterrupted):
    env, root = uninterrupted
    out = root / "damaged"
    env = {**env, "VAE_OUT_DIR": str(out)}
    _kill_at(env, root, "Epoch 4/4")  # epochs 1-3 are done; the copies of epochs 2 and 3 are kept
    newest = out / "checkpoint" / "epoch-0003.weights.h5"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    log = _run_to_end(env, root)
    assert f"cannot read the backup {newest}" in log
    assert "resuming after epoch 2" in log and "Epoch 3/4" in log
    _assert_same_run(out, root / "ref")


def test_no_readable_backup_restarts_training_from_the_first_epoch(tmp_path, dataset_dir, capsys):
    config = vf.Config(epochs=2, warmup_epochs=1, batch_size=64, latent_dim=4, train_samples=256,
                       data_dir=str(dataset_dir), seed=3)
    data = vf.load_fashion_mnist(config)
    noisy = vf.add_noise(data.x_train, config.noise_factor, config.seed)

    def train(out):
        vae = vf.build_vae(config, len(data.x_train))
        history = vf.train_vae(vae, noisy, data.x_train, data.y_train, config, vf.open_checkpoint(out, config), 0)
        return history, [w.numpy() for w in vae.weights]

    reference_history, reference_weights = train(tmp_path / "ref")
    checkpoint = vf.Checkpoint(tmp_path / "ref" / "checkpoint")
    checkpoint.weights.unlink()  # as if killed before the end
    for epoch in (1, 2):
        checkpoint.epoch_weights(epoch).write_bytes(b"not an HDF5 file")
    capsys.readouterr()
    history, weights = train(tmp_path / "ref")
    assert "no readable backup" in capsys.readouterr().out
    pd.testing.assert_frame_equal(history, reference_history)
    for ours, theirs in zip(weights, reference_weights):
        np.testing.assert_array_equal(ours, theirs)


def test_checkpoint_with_other_settings_is_refused_unless_fresh(tmp_path, dataset_dir):
    config = vf.Config(epochs=1, batch_size=64, latent_dim=4, train_samples=128, out_dir=str(tmp_path))
    vf.open_checkpoint(tmp_path, config)
    changed = vf.Config(epochs=2, batch_size=64, latent_dim=4, train_samples=128, out_dir=str(tmp_path))
    with pytest.raises(vf.CheckpointMismatchError, match="epochs: stored 1 vs now 2.*VAE_FRESH=1"):
        vf.open_checkpoint(tmp_path, changed)
    # settings that do not change the model are no reason to refuse
    vf.open_checkpoint(tmp_path, vf.Config(epochs=1, batch_size=64, latent_dim=4, train_samples=128,
                                           test_samples=50, embed_samples=100, out_dir=str(tmp_path)))
    (tmp_path / "checkpoint" / "vae.weights.h5").write_text("stale")
    fresh = vf.open_checkpoint(tmp_path, vf.Config(**{**changed.__dict__, "discard_checkpoint": True}))
    assert not fresh.weights.exists()
    assert json.loads(fresh.fingerprint.read_text())["epochs"] == 2


def test_two_runs_with_the_same_seed_give_the_same_metrics(dataset_dir):
    config = vf.Config(epochs=2, batch_size=64, latent_dim=4, train_samples=256, test_samples=64,
                       data_dir=str(dataset_dir), seed=11)

    def once():
        data = vf.with_noise(vf.load_fashion_mnist(config), config)
        vae = vf.build_vae(config, len(data.x_train))
        vf.train_vae(vae, data.x_train_noisy, data.x_train, data.y_train, config, verbose=0)
        return vf.denoising_summary(vf.evaluate(vae, data, config)["quality"])

    first, second = once(), once()
    assert first == second


def test_a_run_with_the_learned_prior_resumes_bit_for_bit(tmp_path):
    """Killed before the prior is fitted (start of epoch 2), resumed: the fit happens in the resumed run,
    and weights, prior, metrics and history equal an uninterrupted run's."""
    env = {**RESUME, "VAE_PRIOR": "mixture", "VAE_PRIOR_COMPONENTS": "4", "VAE_GEN_METRICS": "0",
           "VAE_DATA_DIR": str(write_dataset(tmp_path / "data"))}
    _run_to_end({**env, "VAE_OUT_DIR": str(tmp_path / "ref")}, tmp_path)
    out = tmp_path / "killed"
    env = {**env, "VAE_OUT_DIR": str(out)}
    _kill_at(env, tmp_path, "Epoch 2/4")
    log = _run_to_end(env, tmp_path)
    assert "resuming after epoch 1" in log
    _assert_same_run(out, tmp_path / "ref")
    ours, theirs = np.load(out / "prior.npz"), np.load(tmp_path / "ref" / "prior.npz")
    for name in ("weights", "means", "variances"):
        np.testing.assert_array_equal(ours[name], theirs[name])
    assert len(np.unique(ours["means"][:, 0])) == 4  # fitted: the components no longer all sit at 0
