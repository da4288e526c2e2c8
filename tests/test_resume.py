"""Interruption and reruns: a run killed at any point and rerun equals an uninterrupted run, bit for bit.
Every killed run is the script in a fresh interpreter, killed by SIGKILL; the uninterrupted run and the reruns
run in this process, as pressing Run all again in a notebook does (conftest.run_here). Every comparison is
also the check that one seed gives the same digits: the killed runs' epochs came from another interpreter."""

import json
import shutil
import signal

import numpy as np
import pandas as pd
import pytest

import vae_fashion as vf
from conftest import ROOT, TINY_RUN, assert_same_run, kill_at, run_here, start_run, write_dataset

# The script, killed by itself half-way through writing the epoch-3 backup: the weights of epoch 3 are half on
# disk under their temporary name, state.json still says epoch 2 is done, the backups of epochs 1 and 2 are kept.
DIES_WRITING_EPOCH_3 = """
import contextlib, os, signal, sys
from pathlib import Path
import vae_fashion as vf
real = vf.atomic_path

@contextlib.contextmanager
def dying(path):
    with real(path) as tmp:
        yield tmp
        if Path(path).name == "epoch-0003.weights.h5":
            tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
            os.kill(os.getpid(), signal.SIGKILL)

vf.atomic_path = dying
sys.exit(vf.cli())
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run that the interrupted ones are compared with."""
    root = tmp_path_factory.mktemp("resume")
    env = {**TINY_RUN, "VAE_DATA_DIR": str(write_dataset(root / "data"))}
    log = run_here({**env, "VAE_OUT_DIR": str(root / "ref")})
    assert "[generation quality]" not in log  # gen_metrics 0: no classifier
    return env, root


@pytest.fixture(scope="module")
def died_writing_a_backup(uninterrupted):
    """The folder a run leaves when it dies while writing the epoch-3 backup (two tests resume copies of it)."""
    env, root = uninterrupted
    out = root / "died-writing"
    victim = start_run({**env, "VAE_OUT_DIR": str(out)}, DIES_WRITING_EPOCH_3, cwd=ROOT)
    log = victim.communicate(timeout=600)[0]
    assert victim.returncode == -signal.SIGKILL, log[-3000:]
    checkpoint = out / "checkpoint"
    assert (checkpoint / ".tmp-epoch-0003.weights.h5").exists()  # the half-written file
    assert json.loads((checkpoint / "state.json").read_text())["epochs_done"] == 2
    assert sorted(p.name for p in checkpoint.glob("epoch-*.weights.h5")) == ["epoch-0001.weights.h5",
                                                                             "epoch-0002.weights.h5"]
    return out


def test_a_finished_run_keeps_the_last_two_epoch_backups_and_no_classifier_figures(uninterrupted):
    env, root = uninterrupted
    checkpoint = root / "ref" / "checkpoint"
    assert sorted(p.name for p in checkpoint.glob("epoch-*.weights.h5")) == ["epoch-0003.weights.h5",
                                                                             "epoch-0004.weights.h5"]
    assert json.loads((checkpoint / "state.json").read_text())["epochs_done"] == 4
    assert not (root / "ref" / "09_generation_quality.png").exists()
    assert "fd_prior_samples" not in set(pd.read_csv(root / "ref" / "metrics.csv")["name"])


def test_kill_mid_training_then_resume_equals_an_uninterrupted_run(uninterrupted):
    env, root = uninterrupted
    out = root / "killed"
    env = {**env, "VAE_OUT_DIR": str(out)}
    kill_at(env, "Epoch 2/4", cwd=root)  # epoch 1 is done and backed up; the prior is fitted before epoch 2
    log = run_here(env)
    assert "resuming after epoch 1" in log
    assert "Epoch 1/4" not in log and "Epoch 2/4" in log
    assert_same_run(out, root / "ref")  # weights, prior, metrics and history
    assert len(np.unique(np.load(out / "prior.npz")["trained_means"][:, 0])) == 10  # fitted: no longer all at 0
    # (a rerun of a finished training: test_a_kill_during_the_analysis_reruns_it_from_the_finished_training)


def test_a_kill_while_a_backup_is_written_resumes_from_the_epoch_before(uninterrupted, died_writing_a_backup):
    env, root = uninterrupted
    out = root / "killed-writing"
    shutil.copytree(died_writing_a_backup, out)
    log = run_here({**env, "VAE_OUT_DIR": str(out)})
    assert "resuming after epoch 2" in log and "Epoch 3/4" in log and "Epoch 2/4" not in log
    assert_same_run(out, root / "ref")


def test_damaged_newest_backup_resumes_from_the_previous_copy(uninterrupted, died_writing_a_backup):
    env, root = uninterrupted
    out = root / "damaged"
    shutil.copytree(died_writing_a_backup, out)
    newest = out / "checkpoint" / "epoch-0002.weights.h5"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    log = run_here({**env, "VAE_OUT_DIR": str(out)})
    assert f"cannot read the backup {newest}" in log
    assert "resuming after epoch 1" in log and "Epoch 2/4" in log
    assert_same_run(out, root / "ref")


def test_a_kill_during_the_analysis_reruns_it_from_the_finished_training(uninterrupted):
    env, root = uninterrupted
    out = root / "killed-analysing"
    env = {**env, "VAE_OUT_DIR": str(out)}
    kill_at(env, "[noise robustness] started", cwd=root)
    log = run_here(env)
    assert "training already finished" in log and "Epoch 1/4" not in log and "resuming" not in log
    assert_same_run(out, root / "ref")


def test_no_readable_backup_restarts_training_from_the_first_epoch(tmp_path, dataset_dir, capsys):
    config = vf.Config(epochs=2, warmup_epochs=1, batch_size=64, latent_dim=4, train_samples=256,
                       data_dir=str(dataset_dir), seed=3)
    data = vf.load_fashion_mnist(config)
    noisy = vf.add_noise(data.x_train, config.noise_factor, config.seed)

    def train(out):
        vae = vf.build_distributed_vae(config)
        history = vf.train_vae(vae, noisy, data.x_train, data.y_train, config, vf.open_checkpoint(out, config), 0)
        return history, [w.numpy() for w in vae.weights]

    reference_history, reference_weights = train(tmp_path / "ref")
    checkpoint = vf.Checkpoint(tmp_path / "ref" / "checkpoint")
    checkpoint.weights.unlink()  # as if killed before the end
    checkpoint.epoch_weights(2).unlink()  # missing: skipped without a word
    checkpoint.epoch_weights(1).write_bytes(b"not an HDF5 file")
    capsys.readouterr()
    history, weights = train(tmp_path / "ref")
    out = capsys.readouterr().out
    assert f"cannot read the backup {checkpoint.epoch_weights(1)}" in out and "epoch-0002" not in out
    assert "no readable backup" in out
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
    same = vf.open_checkpoint(tmp_path, vf.dataclasses.replace(config, fresh=True))  # discarded though it matches
    assert not same.weights.exists() and same.fingerprint.exists()
    (tmp_path / "checkpoint" / "fingerprint.json").write_text("{not json")  # unreadable: differs in everything
    with pytest.raises(vf.CheckpointMismatchError, match="epochs: stored None vs now 1"):
        vf.open_checkpoint(tmp_path, config)
    (tmp_path / "checkpoint" / "vae.weights.h5").write_text("stale")
    fresh = vf.open_checkpoint(tmp_path, vf.dataclasses.replace(changed, fresh=True))
    assert not fresh.weights.exists()
    assert json.loads(fresh.fingerprint.read_text())["epochs"] == 2


def test_a_new_model_takes_a_backup_s_optimizer_state_and_an_empty_checkpoint_restores_nothing(tmp_path, capsys):
    """build_vae builds Adam's variables, so that loading a backup into a model that has not trained (what
    Checkpoint.restore does) restores its step count and moments, not only the weights; a checkpoint without
    history restores nothing, without a word."""
    config = vf.Config(latent_dim=4, seed=3, precision="float32")
    trained = vf.build_distributed_vae(config)
    clean = np.random.default_rng(0).random((8, 28, 28, 1)).astype(np.float32)
    trained.train_step({"noisy": clean, "clean": clean, "label": np.repeat(np.arange(4, dtype=np.int32), 2),
                        "step_key": np.zeros(8, np.int64)})
    trained.save_weights(tmp_path / "one.weights.h5")
    loaded = vf.build_distributed_vae(config)
    loaded.load_weights(tmp_path / "one.weights.h5")
    assert int(loaded.optimizer.iterations.numpy()) == 1
    assert len(loaded.optimizer.variables) == len(trained.optimizer.variables) > 2  # the moments too
    for ours, theirs in zip(loaded.optimizer.variables, trained.optimizer.variables):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    capsys.readouterr()
    assert vf.Checkpoint(tmp_path / "empty").restore(loaded) == [] and capsys.readouterr().out == ""


def test_a_backup_that_loads_only_in_part_leaves_the_model_as_it_was(tmp_path, capsys):
    """Checkpoint.restore: Keras assigns the layers it can read before it fails on the one it cannot (the prior,
    a variable missing here); restore reports the backup unreadable, resumes nothing, and gives the model back
    as it was, not half another model's."""
    import h5py

    checkpoint = vf.Checkpoint(tmp_path)
    vf.build_distributed_vae(vf.Config(latent_dim=4, seed=3, precision="float32")).save_weights(
        checkpoint.epoch_weights(1))
    with h5py.File(checkpoint.epoch_weights(1), "r+") as backup:
        del backup["layers/mixture_prior/vars/2"]
    checkpoint.state.write_text(json.dumps({"epochs_done": 1, "history": [{"epoch": 1, "total_loss": 1.0}]}))
    vae = vf.build_distributed_vae(vf.Config(latent_dim=4, seed=4, precision="float32"))
    before = [v.numpy() for v in vae.variables + vae.optimizer.variables]
    assert checkpoint.restore(vae) == []
    assert f"cannot read the backup {checkpoint.epoch_weights(1)}" in capsys.readouterr().out
    for value, variable in zip(before, vae.variables + vae.optimizer.variables, strict=True):
        np.testing.assert_array_equal(variable.numpy(), value)
