"""Bad input, interruption and reruns: clear errors, nothing lost, nothing faked."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

import vae_fashion as vf
from conftest import IDX_NAMES, ROOT, write_dataset, write_idx

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


def _script(env, **popen):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VAE_")}
    full_env.update(env)
    return subprocess.Popen([sys.executable, "-u", str(ROOT / "vae_fashion.py")], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


RESUME = {"VAE_EPOCHS": "4", "VAE_WARMUP_EPOCHS": "2", "VAE_BATCH_SIZE": "64", "VAE_TRAIN_SAMPLES": "512",
          "VAE_TEST_SAMPLES": "100", "VAE_EMBED_SAMPLES": "60", "VAE_SEED": "5"}
# Metrics of a resumed run must match an uninterrupted one within these bounds (absolute; MSE relative).
# They are not bit-identical: the Sampling layer's noise stream restarts from its seed on resume.
RESUME_TOLERANCE = {"vae_psnr": 0.1, "vae_ssim": 0.01, "vae_mse": 0.02}


def test_kill_mid_training_then_resume_matches_an_uninterrupted_run(tmp_path, dataset_dir):
    env = {**RESUME, "VAE_DATA_DIR": str(dataset_dir)}
    reference = _script({**env, "VAE_OUT_DIR": str(tmp_path / "ref")}, cwd=tmp_path)
    reference_log = reference.communicate(timeout=900)[0]
    assert reference.returncode == 0, reference_log[-3000:]

    out = tmp_path / "killed"
    victim = _script({**env, "VAE_OUT_DIR": str(out)}, cwd=tmp_path)
    seen = []
    deadline = time.time() + 600
    for line in victim.stdout:
        seen.append(line)
        if line.startswith("Epoch 3/4"):  # epochs 1-2 are done and backed up
            victim.send_signal(signal.SIGKILL)
            break
        assert time.time() < deadline, "".join(seen)[-3000:]
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    status = json.loads((out / "run_status.json").read_text())
    assert status["status"] == "running"  # a crashed run is recognisable: never 'finished'
    assert not (out / "metrics.csv").exists()

    resumed = _script({**env, "VAE_OUT_DIR": str(out)}, cwd=tmp_path)
    resumed_log = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, resumed_log[-3000:]
    assert "resuming after epoch 2" in resumed_log
    assert "Epoch 1/4" not in resumed_log and "Epoch 3/4" in resumed_log

    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    reference_history = pd.read_csv(tmp_path / "ref" / "history.csv")
    np.testing.assert_allclose(history["beta"], reference_history["beta"])
    ours = pd.read_csv(out / "metrics.csv").set_index("name")["value"]
    theirs = pd.read_csv(tmp_path / "ref" / "metrics.csv").set_index("name")["value"]
    for name, tolerance in RESUME_TOLERANCE.items():
        scale = theirs[name] if name == "vae_mse" else 1.0
        assert abs(ours[name] - theirs[name]) <= tolerance * scale, (name, ours[name], theirs[name])
    print({name: (ours[name], theirs[name]) for name in RESUME_TOLERANCE})
    assert json.loads((out / "run_status.json").read_text())["status"] == "finished"

    # A finished run is not trained again.
    again = _script({**env, "VAE_OUT_DIR": str(out)}, cwd=tmp_path)
    again_log = again.communicate(timeout=900)[0]
    assert again.returncode == 0 and "training already finished" in again_log
    assert "Epoch 1/4" not in again_log
    assert pd.read_csv(out / "metrics.csv").set_index("name")["value"]["vae_psnr"] == pytest.approx(ours["vae_psnr"])


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
    fresh = vf.open_checkpoint(tmp_path, vf.Config(**{**changed.__dict__, "fresh": True}))
    assert not fresh.weights.exists()
    assert json.loads(fresh.fingerprint.read_text())["epochs"] == 2


def test_two_runs_with_the_same_seed_give_the_same_metrics(dataset_dir):
    config = vf.Config(epochs=2, batch_size=64, latent_dim=4, train_samples=256, test_samples=64,
                       data_dir=str(dataset_dir), seed=11)

    def once():
        data = vf.load_fashion_mnist(config)
        noisy_train = vf.add_noise(data.x_train, config.noise_factor, config.seed)
        noisy_test = vf.add_noise(data.x_test, config.noise_factor, config.seed + 1)
        vae = vf.build_vae(config, len(data.x_train))
        vf.train_vae(vae, noisy_train, data.x_train, data.y_train, config, verbose=0)
        evaluation = vf.evaluate(vae, data, noisy_train, noisy_test, config)
        return vf.denoising_summary(evaluation.noisy_quality, evaluation.vae_quality)

    first, second = once(), once()
    for name in first:
        assert second[name] == pytest.approx(first[name], rel=1e-5, abs=1e-6), name
