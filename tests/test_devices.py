"""Kaggle's GPU paths, exercised on this CPU: two logical devices stand in for two GPUs
(MirroredStrategy), mixed_float16 for the T4's precision, jit_compile=True for XLA."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pandas as pd
import pytest

import vae_fashion as vf
from conftest import ROOT, TINY_RUN, assert_same_run, finish_run, kill_at, write_dataset

# Split the CPU into two logical devices before TensorFlow starts using it.
TWO_CPUS = (
    "import tensorflow as tf\n"
    "cpu = tf.config.list_physical_devices('CPU')[0]\n"
    "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
)


def _python(code: str, timeout: int = 600) -> str:
    """Run code in a fresh interpreter (the dtype policy and the devices are process-wide)."""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=timeout, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def _results(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ precision and fingerprint


@pytest.mark.parametrize("capability, policy", [
    ((6, 0), "float32"),  # P100: no Tensor Cores, float16 buys no math speed
    ((7, 0), "mixed_float16"), ((7, 5), "mixed_float16"),  # V100, T4
    ((8, 0), "mixed_bfloat16"), ((9, 0), "mixed_bfloat16"),  # A100, H100
])
def test_auto_precision_per_gpu_compute_capability(capability, policy):
    assert vf.resolve_precision(vf.Config(), compute_capability=capability) == policy
    assert vf.resolve_precision(vf.Config(precision="float32"), compute_capability=capability) == "float32"


def test_the_fingerprint_records_the_resolved_precision_and_the_replicas(tmp_path):
    config = vf.Config(epochs=1, batch_size=64, precision="auto")
    fingerprint = vf.training_fingerprint(config, replicas=2)
    assert fingerprint["precision"] == vf.resolve_precision(config) != "auto"
    assert fingerprint["replicas"] == 2 and "devices" not in fingerprint
    vf.open_checkpoint(tmp_path, config, replicas=1)
    with pytest.raises(vf.CheckpointMismatchError, match="replicas: stored 1 vs now 2.*VAE_FRESH=1"):
        vf.open_checkpoint(tmp_path, config, replicas=2)
    other = "float32" if vf.resolve_precision(config) != "float32" else "mixed_bfloat16"
    with pytest.raises(vf.CheckpointMismatchError, match=f"precision: stored .* vs now '{other}'"):
        vf.open_checkpoint(tmp_path, vf.Config(epochs=1, batch_size=64, precision=other), replicas=1)


def test_several_replicas_train_on_full_batches_that_split_evenly():
    config = vf.Config(batch_size=64)
    assert vf.batches_per_epoch(500, config, 1) == 8  # one device: every image, the last batch partial
    assert vf.batches_per_epoch(500, config, 2) == 7  # two: the 52 images left over are dropped
    with pytest.raises(vf.ConfigError, match="VAE_BATCH_SIZE=64 does not split evenly over 3 replicas"):
        vf.batches_per_epoch(500, config, 3)
    with pytest.raises(vf.ConfigError, match="VAE_TRAIN_SAMPLES=40 is less than one batch"):
        vf.batches_per_epoch(40, config, 2)
    assert vf.batches_per_epoch(64, config, 2) == 1  # exactly one batch is enough
    # the dataset agrees: 7 full batches an epoch on two replicas, 8 with a partial one on one device
    x, labels = np.zeros((500, 28, 28, 1), np.float32), np.zeros(500, np.int32)
    for replicas, sizes in ((2, [64] * 7), (1, [64] * 7 + [52])):
        dataset = vf.make_train_dataset(x, x, labels, config, 0, epochs=1, replicas=replicas)
        assert [len(batch["label"]) for batch in dataset] == sizes, replicas


def test_all_devices_mirror_over_the_gpus_else_over_the_cpu_s_logical_devices(monkeypatch):
    """Which devices "all" trains on, decided from the device lists (stand-ins here: one CPU in this process)."""
    listed = {"GPU": [], "CPU": ["CPU:0"]}
    monkeypatch.setattr(vf.tf.config, "list_logical_devices", lambda kind: [
        types.SimpleNamespace(name=f"/device:{name}") for name in listed[kind]])
    monkeypatch.setattr(vf.tf.distribute, "MirroredStrategy", lambda names: ("mirrored", names))
    default, every = vf.tf.distribute.get_strategy(), vf.Config(devices="all", precision="float32")
    assert vf.setup_devices(every) is default  # a single device
    listed["CPU"] = ["CPU:0", "CPU:1"]
    assert vf.setup_devices(every) == ("mirrored", ["/device:CPU:0", "/device:CPU:1"])
    listed["GPU"] = ["GPU:0", "GPU:1"]
    assert vf.setup_devices(every) == ("mirrored", ["/device:GPU:0", "/device:GPU:1"])
    assert vf.setup_devices(vf.Config(devices="one", precision="float32")) is default
    listed["GPU"] = ["GPU:0"]  # one GPU: not mirrored with the CPUs
    assert vf.setup_devices(every) is default


def test_setup_devices_asks_for_a_thread_per_cpu_and_goes_on_once_tensorflow_has_started(monkeypatch):
    """docs/RESULTS.md: an explicit intra-op thread count (the CPU count) trains faster than TensorFlow's own choice
    (0), which it falls back to when the count is unknown; TensorFlow refuses the setting once it has run an
    operation (RuntimeError), and the set-up goes on. Stand-ins here: this process's TensorFlow has started."""
    asked = []

    def set_threads(count):
        asked.append(count)
        raise RuntimeError("Intra op parallelism cannot be modified after initialization.")

    monkeypatch.setattr(vf.tf.config.threading, "set_intra_op_parallelism_threads", set_threads)
    monkeypatch.setattr(vf.os, "cpu_count", lambda: 6)
    vf.setup_devices(vf.Config(precision="float32"))
    monkeypatch.setattr(vf.os, "cpu_count", lambda: None)
    vf.setup_devices(vf.Config(precision="float32"))
    assert asked == [6, 0]


def test_the_device_line_names_every_replica_s_device_else_the_first_gpu(monkeypatch):
    """device_summary: with several replicas, each replica's device, shortened to its kind and number; with one,
    the first GPU TensorFlow lists (it places the work there), else CPU:0. Stand-in device lists and strategy."""
    gpus = [types.SimpleNamespace(name=f"/job:localhost/replica:0/task:0/device:GPU:{k}") for k in (0, 1)]
    monkeypatch.setattr(vf.tf.config, "list_logical_devices", lambda kind: gpus if kind == "GPU" else [])
    mirrored = types.SimpleNamespace(num_replicas_in_sync=2, extended=types.SimpleNamespace(
        worker_devices=[gpu.name for gpu in gpus]))
    assert vf.device_summary(mirrored).startswith("devices: GPU:0, GPU:1; 2 replica(s); precision ")
    one = types.SimpleNamespace(num_replicas_in_sync=1, extended=None)
    assert vf.device_summary(one).startswith("devices: GPU:0; 1 replica(s); precision ")
    gpus.clear()
    assert vf.device_summary(one).startswith("devices: CPU:0; 1 replica(s); precision ")


def test_only_several_replicas_in_sync_have_a_replica_context(monkeypatch):
    assert vf.replica_context() is None  # this process: the default strategy's one replica
    for replicas, expected in ((1, False), (2, True), (3, True)):
        context = types.SimpleNamespace(num_replicas_in_sync=replicas)
        monkeypatch.setattr(vf.tf.distribute, "get_replica_context", lambda context=context: context)
        assert (vf.replica_context() is context) is expected, replicas
    monkeypatch.setattr(vf.tf.distribute, "get_replica_context", lambda: None)  # cross-replica context
    assert vf.replica_context() is None


def test_keyed_noise_is_the_global_batch_s_whichever_replica_draws_it(monkeypatch):
    """keyed_normal: each of two replicas (stand-in contexts) gets its own half of the one-device draw for the
    global batch; and the draw for (seed 42, key 5) is the one every run so far trained with (values from
    TensorFlow 2.16.1 and 2.21, which agree): a change of stream would change every run's numbers."""
    whole = vf.keyed_normal((6, 3), "float32", 42, 5).numpy()
    np.testing.assert_allclose(whole[:2], [[0.6118882, -0.3977123, 1.3996007], [0.544648, 0.10317855, 1.0881493]],
                               rtol=1e-6)
    for replica in (0, 1):
        context = types.SimpleNamespace(num_replicas_in_sync=2, replica_id_in_sync_group=replica)
        monkeypatch.setattr(vf, "replica_context", lambda context=context: context)
        np.testing.assert_array_equal(vf.keyed_normal((3, 3), "float32", 42, 5).numpy(),
                                      whole[3 * replica:3 * replica + 3])


def test_the_train_step_maps_noisy_to_clean_with_the_batch_s_keyed_posterior_sample():
    """DistributedVAE.train_step, on one device: the losses it reports are compute_losses(noisy, clean, labels) of
    the weights before its update, with keyed_normal's noise for the whole batch (its rows, the latent size, the
    posterior stream, the batch's step key)."""
    config = vf.Config(latent_dim=4, seed=3, precision="float32")
    vae = vf.build_distributed_vae(config)
    clean = np.random.default_rng(0).random((8, 28, 28, 1)).astype(np.float32)
    noisy, labels = vf.add_noise(clean, 0.45, 1), np.repeat(np.arange(4, dtype=np.int32), 2)
    epsilon = vf.keyed_normal((8, 4), "float32", vf.seed_for(config, "posterior"), 5)
    expected = vae.compute_losses(noisy, clean, labels, epsilon, training=True)
    reported = vae.train_step({"noisy": noisy, "clean": clean, "label": labels, "step_key": np.full(8, 5, np.int64)})
    for name in vf.LOSS_TERMS:
        assert float(reported[name]) == pytest.approx(float(expected[name]), rel=1e-5), name


def test_a_tpu_runtime_is_told_that_the_run_uses_the_host_cpu(monkeypatch):
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v3-8")
    line = vf.device_summary(vf.tf.distribute.get_strategy())
    assert "1 replica(s)" in line and "TPU runtime (TPU_ACCELERATOR_TYPE=v3-8)" in line and "host CPU" in line


# ------------------------------------------------------------------ a few steps on small batches, in one interpreter

STEP_CHECKS = TWO_CPUS + """
import json, sys, numpy as np, vae_fashion as vf
sys.path.insert(0, 'tests')
from conftest import synthetic_split
results = {}
x = np.random.default_rng(0).random((32, 28, 28, 1)).astype(np.float32)
labels = (np.arange(32) % 4).astype(np.int32)
keys = np.full(32, 7, np.int64)

def halves(strategy, *arrays):
    def part(a):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: a[16 * ctx.replica_id_in_sync_group:16 * (ctx.replica_id_in_sync_group + 1)])
    return [part(a) for a in arrays]

def loss_and_grads(vae, noisy, clean, label, key, replicas):
    # the posterior sample keyed as DistributedVAE.train_step keys it, each replica taking its rows
    epsilon = vf.keyed_normal((tf.shape(noisy)[0], 4), "float32", vf.seed_for(vae.config, "posterior"), key[0])
    with tf.GradientTape() as tape:
        losses = vae.compute_losses(noisy, clean, label, epsilon, training=True)
        objective = losses["total_loss"] / replicas
    return losses, tape.gradient(objective, vae.trainable_weights)

# 1. Two devices: SupCon over the whole global batch: the loss and the summed gradient of a fixed batch on two
#    devices equal those on one (the posterior sample too: it is drawn for the global batch).
config = vf.Config(latent_dim=4, batch_size=32, seed=0, devices="all", precision="float32")
strategy = vf.setup_devices(config)
results["replicas"] = strategy.num_replicas_in_sync
one, two = vf.build_distributed_vae(config), vf.build_distributed_vae(config, strategy)
two.set_weights(one.get_weights())
for vae in (one, two):  # the KL's weight of epoch 5: beta 5/8
    vae.steps_per_epoch = 10
    vae.optimizer.iterations.assign(40)
losses_one, grads_one = loss_and_grads(one, x, x, labels, keys, 1)
losses_two, grads_two = tf.function(lambda *a: strategy.run(lambda *b: loss_and_grads(two, *b, 2), args=a))(
    *halves(strategy, x, x, labels, keys))
results["loss_rel"] = {name: abs(float(strategy.reduce("MEAN", losses_two[name], axis=None)) / float(value) - 1)
                       for name, value in losses_one.items()}
summed = [strategy.reduce("SUM", g, axis=None) for g in grads_two]
# relative to the whole gradient's norm: some gradients are zero up to rounding (the prior's logits while every
# component is still the standard normal), and a per-variable ratio of two rounding errors means nothing
scale = float(tf.linalg.global_norm(grads_one))
results["grad_rel"] = max(float(tf.norm(a - b)) / scale for a, b in zip(grads_one, summed))
results["grad_rel_largest"] = max(float(tf.norm(a - b) / tf.norm(a)) for a, b in zip(grads_one, summed)
                                  if float(tf.norm(a)) > 1e-3 * scale)

# 2. Two devices: float16 overflow on one replica only (a huge target on its half; gamma_sc 0 keeps the replicas'
#    gradients apart): every replica skips the step and the loss scale halves, whichever replica it was.
config = vf.Config(latent_dim=4, batch_size=32, seed=0, devices="all", precision="mixed_float16", gamma_sc=0.0)
strategy = vf.setup_devices(config)
vae = vf.build_distributed_vae(config, strategy)
with strategy.scope():
    vae.optimizer.build(vae.trainable_variables)
step = tf.function(lambda batch: strategy.run(vae.train_step, args=(batch,)))

def unchanged(before):
    return all(np.array_equal(w.numpy(), b) for w, b in zip(vae.trainable_weights, before))

results["overflow"] = []
for bad in (1, 0):
    clean = x.copy()
    clean[16 * bad:16 * (bad + 1)] = 6e4
    scale = float(vae.optimizer.dynamic_scale.numpy())
    before = [w.numpy() for w in vae.trainable_weights]
    noisy, target, label, key = halves(strategy, x, clean, labels, keys)
    step({"noisy": noisy, "clean": target, "label": label, "step_key": key})
    results["overflow"].append({
        "replica": bad, "scale_ratio": float(vae.optimizer.dynamic_scale.numpy()) / scale,
        "unchanged": unchanged(before)})
# ... and a finite batch is applied on both (once the loss scale has come down far enough for float16)
before, noisy, target, label, key = [w.numpy() for w in vae.trainable_weights], *halves(strategy, x, x, labels, keys)
for tried in range(1, 17):
    step({"noisy": noisy, "clean": target, "label": label, "step_key": key})
    changed = not unchanged(before)
    if changed:
        break
results["finite_steps_tried"] = tried
results["finite_step_applied"] = changed and all(bool(np.isfinite(w.numpy()).all()) for w in vae.trainable_weights)

# 3 and 4 run on one device (the default strategy) and learn bar images that a few steps can fit.
images, labels = synthetic_split(512, 0)
x = vf.to_unit_float(images)
noisy = vf.add_noise(x, 0.45, 1)
y = labels.astype(np.int32)

# 3. One device: the gradient Adam receives under mixed_float16 (unscaled by the loss-scale optimizer) is the
#    float32 gradient, to float16's precision.
config32 = vf.Config(latent_dim=4, batch_size=32, seed=0, precision="float32")
vf.setup_devices(config32)
reference = vf.build_distributed_vae(config32)
config16 = vf.Config(latent_dim=4, batch_size=32, seed=0, precision="mixed_float16")
vf.setup_devices(config16)
vae = vf.build_distributed_vae(config16)
vae.set_weights(reference.get_weights())
batch = {"noisy": noisy[:32], "clean": x[:32], "label": y[:32], "step_key": np.full(32, 3, np.int64)}
# beta is that of epoch 1 in both: the first applied step lies in the first epoch (16 steps)
epsilon = vf.keyed_normal((32, 4), "float32", vf.seed_for(config32, "posterior"), 3)
with tf.GradientTape() as tape:
    loss = reference.compute_losses(batch["noisy"], batch["clean"], batch["label"], epsilon, training=True)
expected = tape.gradient(loss["total_loss"], reference.trainable_weights)
received = []
inner = vae.optimizer.inner_optimizer
inner.apply = lambda grads, trainable_variables=None: received.append([g.numpy() for g in grads])
skipped = 0
while not received:  # the first steps at scale 2**15 may overflow and are skipped, weights untouched
    vae.train_step(batch)
    skipped += 1
results["float16_policy"] = vae.dtype_policy.name
flat_received = np.concatenate([g.ravel() for g in received[0]])
flat_expected = np.concatenate([e.numpy().ravel() for e in expected])
results["float16_grad_rel"] = float(np.linalg.norm(flat_received - flat_expected) / np.linalg.norm(flat_expected))
results["float16_grad_rel_worst_layer"] = max(float(np.linalg.norm(g - e.numpy()) / np.linalg.norm(e.numpy()))
                                              for g, e in zip(received[0], expected))
results["float16_skipped_steps"] = skipped - 1  # the last call applied its step

# 4. One device: the train step and predict compiled by XLA (jit_compile=True; Keras' "auto" compiles on one GPU,
#    never on a CPU), in float32 and mixed_float16: the loss falls, and predict agrees with the plain one.
# float16 on a CPU is an emulation (570x slower than float32 on an Intel Xeon with AMX): few, small steps.
for precision in ("float32", "mixed_float16"):
    config = vf.Config(latent_dim=4, batch_size=32, epochs=3, warmup_epochs=2, seed=0, precision=precision)
    vf.setup_devices(config)
    vae = vf.build_distributed_vae(config, jit_compile=True)
    history = vf.train_vae(vae, noisy[:256], x[:256], y[:256], config, verbose=0)
    plain = vae.encoder.predict(noisy[:100], verbose=0)[0]
    vae.encoder.compile(jit_compile=True)
    compiled = vae.encoder.predict(noisy[:100], verbose=0)[0]
    results[f"xla_{precision}"] = {"jit": bool(vae.jit_compile), "recon": history["recon_loss"].tolist(),
                                   "predict_diff": float(np.abs(plain - compiled).max()),
                                   "scale": float(np.max(np.abs(plain)))}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def step_checks():
    return _results(_python(STEP_CHECKS))


def test_two_devices_give_the_one_device_loss_and_gradient_of_a_fixed_batch(step_checks):
    assert step_checks["replicas"] == 2
    for name, relative in step_checks["loss_rel"].items():
        assert relative <= 1e-5, (name, relative)
    assert step_checks["grad_rel"] <= 1e-4 and step_checks["grad_rel_largest"] <= 1e-4, step_checks


def test_a_float16_overflow_on_any_replica_is_skipped_on_every_replica(step_checks):
    assert [o["replica"] for o in step_checks["overflow"]] == [1, 0]
    for outcome in step_checks["overflow"]:
        assert outcome["unchanged"], outcome  # no inf in the weights, no half-applied step
        assert outcome["scale_ratio"] == 0.5, outcome
    assert step_checks["finite_step_applied"], step_checks["finite_steps_tried"]


def test_mixed_float16_hands_adam_the_float32_gradient(step_checks):
    assert step_checks["float16_policy"] == "mixed_float16"
    # float16 keeps 11 significant bits; the rounding compounds layer by layer back to the first convolution
    # (measured at this batch of 32: 3.2 % over all weights, 4.4 % on the worst layer). A loss scale left in,
    # or a skipped step's gradient let through, would be off by factors, not percents.
    assert step_checks["float16_grad_rel"] < 0.05, step_checks
    assert step_checks["float16_grad_rel_worst_layer"] < 0.1, step_checks
    # the loss scale starts at 2^15 and halves at every overflow until the gradients fit float16: README's
    # "about the first 8" skipped steps (measured 8 at batches of 32 and 64); a scale that never settles, or no
    # skipping at all, falls outside
    assert 6 <= step_checks["float16_skipped_steps"] <= 10, step_checks


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_the_xla_compiled_step_trains_and_predict_agrees(step_checks, precision):
    outcome = step_checks[f"xla_{precision}"]
    assert outcome["jit"]
    assert np.all(np.isfinite(outcome["recon"])) and outcome["recon"][-1] < 0.9 * outcome["recon"][0], outcome
    tolerance = 1e-4 if precision == "float32" else 1e-2
    assert outcome["predict_diff"] <= tolerance * max(1.0, outcome["scale"]), outcome


# ------------------------------------------------------------------ run() on two devices

def runs_on_two_cpus(*outs) -> str:
    """The script's run() into each folder in turn, in one interpreter on two logical devices."""
    return TWO_CPUS + (
        "import os, vae_fashion as vf\n"
        f"for out in {[str(out) for out in outs]!r}:\n"
        "    print('=== run into', out, flush=True)\n"
        "    vf.main({**os.environ, 'VAE_OUT_DIR': out})\n")


def test_run_on_two_devices_resumes_after_a_kill_and_reuses_a_finished_training(tmp_path):
    """Through run() on two replicas, in float32 (fast on every CPU; float16 itself is checked step by step
    above): an uneven last batch (500 = 7 x 64 + 52), a kill in epoch 3, the resume, and a rerun of the
    finished training. The reruns share the uninterrupted run's interpreter, as Run all pressed again does."""
    env = {**TINY_RUN, "VAE_DEVICES": "all", "VAE_PRECISION": "float32", "VAE_TRAIN_SAMPLES": "500",
           "VAE_DATA_DIR": str(write_dataset(tmp_path / "data"))}
    ref, out = tmp_path / "ref", tmp_path / "killed"
    kill_at({**env, "VAE_OUT_DIR": str(out)}, "Epoch 3/4", runs_on_two_cpus(out), cwd=ROOT)

    _, uninterrupted, resumed, again = finish_run(env, runs_on_two_cpus(ref, out, out), cwd=ROOT).split("=== run into ")
    assert "2 replica(s); precision float32" in uninterrupted
    assert "7/7" in uninterrupted and "ms per step: the 4 epochs take about" in uninterrupted
    history = pd.read_csv(ref / "history.csv")
    assert np.all(np.isfinite(history.drop(columns="epoch").to_numpy()))
    assert history["recon_loss"].iloc[-1] < history["recon_loss"].iloc[0]
    assert json.loads((ref / "checkpoint" / "fingerprint.json").read_text())["replicas"] == 2

    assert "resuming after epoch 2" in resumed and "Epoch 1/4" not in resumed and "Epoch 3/4" in resumed
    assert "training already finished" in again and "Epoch" not in again
    assert_same_run(out, ref)
