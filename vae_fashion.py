# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # VAE on Fashion-MNIST: denoising, representation learning, generation, interpolation
#
# One code cell does everything. It loads Fashion-MNIST, adds Gaussian noise
# (`clip(x + 0.45*N(0,1), 0, 1)`) and trains a variational auto-encoder that maps noisy
# images to clean ones, with the loss `BCE + beta*KL + gamma_sc*w*SupCon(z_mean)`: the
# supervised contrastive term (scaled by `w` to the size of the BCE term) makes the classes
# separate in the latent space. It then writes metrics, latent-space plots (PCA / UMAP /
# t-SNE), prior samples and latent interpolations to `vae_outputs_v3/`
# (`/kaggle/working/vae_outputs_v3` on Kaggle).
#
# **The cell, in order**: 1 settings (`OVERRIDES`, `Config`, whose fields declare every setting's default,
# bounds and meaning); 2 the model (`VAE`: its `train_step`, `encode()`, `denoise()`, `generate()`); 3 the data
# and the noise; 4 training (`build_vae()`, `FitSchedule`, `FitPrior`). Sections 1-4 stand alone: copied into a
# notebook, `vae.fit(noisy, (clean, labels))` trains the run's VAE. 5 analysis (`analyse()` into `Results`);
# 6 drawing (`render()` draws `Results` into the files of `OUTPUTS`, never running the model); 7 reports;
# 8 `run()`; 9 the appendix: errors, settings parsing, devices and precisions, `DistributedVAE` (several
# devices, exact resume, new noise every epoch), data loading, checkpoints, run status.
#
# **Changing a setting on Kaggle**: edit the line `OVERRIDES = {}` at the top of the cell,
# for example `OVERRIDES = {"epochs": 5, "train_samples": 10000}`. `OVERRIDES` wins over
# the defaults and loses to environment variables (`VAE_EPOCHS=5`, ...), which is how CI and
# nbconvert set them. `config.json` in the output folder records the settings that ran.
#
# This notebook is generated from `vae_fashion.py` with `jupytext --to ipynb vae_fashion.py`;
# edit the script, not the notebook.

# %%
"""VAE denoising + representation learning + generation on Fashion-MNIST."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import difflib
import gzip
import itertools
import json
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers, ops  # noqa: E402

# =============================================================================
# 1. Settings
# =============================================================================

OUT_FOLDER = "vae_outputs_v3"  # the original's name; below /kaggle/working on Kaggle (default_out_dir)

# Change settings here, e.g. OVERRIDES = {"epochs": 5, "train_samples": 10000}.
# They win over the defaults below and lose to VAE_* environment variables.
OVERRIDES: dict = {}

# Named sets of defaults (VAE_PRESET, OVERRIDES["preset"] or Config(preset=...)); settings named one by one win.
PRESETS = {
    "default": {},
    # the original notebook: raw-nats SupCon, one fixed noisy copy, width 128, constant Adam 0.001,
    # float32, one convolution per level, 28x28 output layers, 20 epochs
    "faithful": {"supcon_scale": "none", "gamma_sc": 1.0, "fresh_noise": False, "hidden_units": 128,
                 "learning_rate": 0.001, "lr_schedule": "constant", "precision": "float32",
                 "encoder_depth": 1, "decoder_depth": 1, "output_layer": "conv", "epochs": 20, "prior": "normal",
                 "generator": "prior"},
    # a larger model trained longer, for a GPU or time to spare
    "quality": {"epochs": 40, "warmup_epochs": 10, "latent_dim": 32, "decoder_depth": 3, "hidden_units": 512},
}


class VAEFashionError(Exception):
    """Base class of every error this pipeline reports to the user."""


class ConfigError(VAEFashionError, ValueError):
    """A setting (Config(...), an OVERRIDES entry or an environment variable) does not parse or is out of range."""


def setting(default, group: str, meaning: str, kind=None, low=None, high=None, *, open_low: bool = False,
            trains: bool = True):
    """One setting, declared once: its default, type (int, float, str, bool (0 or 1), or a tuple of
    allowed words), bounds, group and one-line meaning. Its environment variable VAE_<NAME>, the checks,
    the settings tables and the training fingerprint (`trains`) read it here."""
    kind = kind if kind is not None else type(default)
    return dataclasses.field(default=default, metadata={
        "group": group, "meaning": meaning, "kind": kind, "low": low, "high": high, "open_low": open_low,
        "trains": trains})


@dataclasses.dataclass(frozen=True, init=False)
class Config:
    """Every setting of a run: the key of OVERRIDES, and the environment variable VAE_<KEY in capitals>.

    Config(preset="faithful", epochs=5) starts from the preset's values, the settings named win, and every
    value is checked against its declaration (ConfigError). (dataclasses.replace keeps every other value: a
    preset applies at construction.)"""

    preset: str = setting("default", "preset", "a named set of defaults: faithful, the original notebook's; "
                          "quality, a larger model trained longer (PRESETS)", tuple(PRESETS), trains=False)
    # data
    data_dir: str | None = setting(None, "data", "folder with the four IDX files or the Kaggle CSVs (unset: searched)",
                                   str, trains=False)
    train_samples: int | None = setting(None, "data", "use the first N training images (unset: all 60000)", int,
                                        2, 10**9)
    test_samples: int | None = setting(None, "data", "use the first N test images (unset: all 10000)", int, 20, 10**9,
                                       trains=False)
    noise_factor: float = setting(0.45, "data", "sigma of the Gaussian noise, before clipping to [0, 1]", low=0.0,
                                  high=10.0)
    fresh_noise: bool = setting(True, "data", "1: new training noise every epoch; 0: one fixed noisy copy")
    # model
    latent_dim: int = setting(16, "model", "latent dimensions", low=2, high=4096)
    hidden_units: int = setting(256, "model", "width of the dense layer on each side of the latent", low=8, high=8192)
    encoder_depth: int = setting(2, "model", "convolutions per encoder level: a stride-2 one and depth - 1 at stride 1",
                                 low=1, high=8)
    decoder_depth: int = setting(2, "model", "the same for the decoder's transposed convolutions", low=1, high=8)
    output_layer: str = setting("subpixel", "model", "decoder output: subpixel (a 14x14 convolution to 4 channels and "
                                "a pixel shuffle) or conv (28x28 layers)", ("subpixel", "conv"))
    # loss
    beta_max: float = setting(1.0, "loss", "KL weight after the warm-up", low=0.0, high=1e6)
    warmup_epochs: int = setting(8, "loss", "epochs over which beta rises linearly to beta_max", low=0, high=10_000)
    gamma_sc: float = setting(0.25, "loss", "weight of SupCon (0: a plain denoising VAE)", low=0.0, high=1e6)
    supcon_scale: str = setting("recon", "loss", "recon: gamma_sc is relative to the BCE term; none: raw nats",
                                ("recon", "none"))
    supcon_temperature: float = setting(0.1, "loss", "SupCon temperature", low=0.0, high=100.0, open_low=True)
    prior: str = setting("mixture", "loss", "mixture: a learned Gaussian mixture, fitted to the posteriors after "
                         "the first epoch and trained with the model; normal: N(0, I), the original's",
                         ("mixture", "normal"))
    prior_components: int = setting(10, "loss", "components of the mixture prior", low=1, high=1000)
    # optimisation
    epochs: int = setting(17, "optimisation", "training epochs", low=1, high=10_000)
    batch_size: int = setting(256, "optimisation", "batch size (SupCon needs pairs)", low=2, high=65_536)
    learning_rate: float = setting(2e-3, "optimisation", "Adam's peak learning rate", low=0.0, high=10.0,
                                   open_low=True)
    lr_schedule: str = setting("cosine", "optimisation", "cosine: decay to 5 % over the run; constant",
                               ("cosine", "constant"))
    seed: int = setting(42, "optimisation", "every random draw follows from it", low=0, high=2**31 - 1)
    precision: str = setting("auto", "optimisation", "auto: bfloat16 on a CPU where it measured faster, on a GPU "
                             "by compute capability (bfloat16 or float16), else float32",
                             ("auto", "float32", "mixed_float16", "mixed_bfloat16"))
    # the fingerprint records the replica count instead
    devices: str = setting("one", "optimisation", "one: the first GPU, else the CPU; all: MirroredStrategy over "
                           "every GPU", ("one", "all"), trains=False)
    # generation
    generator: str = setting("expost", "generation", "the density the shown and saved samples come from: expost, a "
                             "Gaussian mixture fitted to the training z_mean after training; prior, the prior the "
                             "KL trained against (N(0, I) with prior normal, as in the original)", ("expost", "prior"),
                             trains=False)
    expost_components: int = setting(80, "generation", "components of the expost mixture (full covariances)", low=1,
                                     high=1000, trains=False)
    conditional_components: int = setting(10, "generation", "components of each class's mixture for the class-"
                                          "conditional samples (full covariances; at most one per latent_dim + 1 of "
                                          "the class's z_mean fitted)", low=1, high=1000, trains=False)
    # evaluation
    embed_samples: int = setting(3000, "evaluation", "seeded test subset for t-SNE and UMAP (0: neither, for a quick "
                                 "run)", low=0, high=10**7,
                                 trains=False)
    classical_samples: int = setting(1000, "evaluation", "seeded test subset for the TV and non-local-means rows",
                                     low=1, high=10**6, trains=False)
    gen_metrics: bool = setting(True, "evaluation", "0 skips the generation-quality classifier and its figures",
                                trains=False)
    # output
    out_dir: str = setting(OUT_FOLDER, "output", "where every output goes (/kaggle/working/... on Kaggle)",
                           trains=False)
    fresh: bool = setting(False, "output", "1: discard a checkpoint made with other settings and train afresh",
                          trains=False)

    def __init__(self, preset: str = "default", **settings):
        for name, value in {"preset": preset, **PRESETS.get(preset, {}), **settings}.items():
            if name not in SETTINGS:
                raise TypeError(f"Config() got an unexpected setting {name!r}")
            problem = setting_problem(name, value)
            if problem:
                raise ConfigError(f"Config({name}={value!r}) {problem}")
            kind = SETTINGS[name]["kind"]  # a plain bool, int, float or str, as config.json records it
            object.__setattr__(self, name, value if value is None or isinstance(kind, tuple) else kind(value))


# field -> its declaration (see setting())
SETTINGS = {field.name: {**field.metadata, "env": f"VAE_{field.name.upper()}", "default": field.default}
            for field in dataclasses.fields(Config)}


def setting_problem(name: str, value) -> str | None:
    """What keeps `value` from being setting `name` (its type, words or bounds), or None when nothing does."""
    rule = SETTINGS[name]
    kind, low, high = rule["kind"], rule["low"], rule["high"]
    if value is None and rule["default"] is None:
        return None
    if kind is bool or isinstance(kind, tuple):
        words = (0, 1) if kind is bool else kind
        return None if value in words and not isinstance(value, float) else (
            f"must be {', '.join(map(str, words[:-1]))} or {words[-1]}")
    if kind is str:
        return None if isinstance(value, (str, os.PathLike)) else "must be text"
    whole = (int, np.integer)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, whole if kind is int else (*whole, float)):
        return "is not a whole number" if kind is int else "is not a number"
    if not math.isfinite(value):
        return "must be a finite number"
    if (value <= low if rule["open_low"] else value < low) or value > high:
        return f"is out of range: it must lie in {'(' if rule['open_low'] else '['}{low}, {high}]"
    return None


IMAGE_SIZE = 28
NUM_CLASSES = 10
PRIOR_FIT_SAMPLES = 10_000  # training posteriors the mixture prior is fitted to by EM (FitPrior)

# Every random draw has its own named stream, seed_for(config, name) = VAE_SEED + offset, so that a
# change in one draw moves no other. The weights (Keras' global generator, set by build_vae) and the
# batch order (TensorFlow's stateless generator keyed by (VAE_SEED, epoch)) use VAE_SEED itself. run()'s
# training draws are keyed by (epoch, step), never by a generator's hidden state, so a resumed run
# repeats an uninterrupted one exactly (DistributedVAE). Section 5 adds the analysis's streams.
SEED_OFFSETS = {"train_noise": 1_000_000_007, "posterior": 2_000_000_011, "train_noise_fixed": 8, "test_noise": 1,
                "prior_fit": 17}


def seed_for(config: Config, draw: str) -> int:
    return config.seed + SEED_OFFSETS[draw]


def seeded_subset(n: int, size: int, rng, in_order: bool = True) -> np.ndarray:
    """Indices of min(size, n) of range(n) drawn without replacement by rng (a seed or a numpy Generator),
    sorted unless in_order=False (the draw's own order)."""
    drawn = np.random.default_rng(rng).permutation(n)[: min(size, n)]
    return np.sort(drawn) if in_order else drawn


# =============================================================================
# 2. Model: Sampling, encoder, decoder, loss terms, the learned prior, and the VAE's train_step
# =============================================================================


@keras.saving.register_keras_serializable(package="vae_fashion")
class Sampling(layers.Layer):
    """z = z_mean + exp(z_log_var / 2) * epsilon, epsilon ~ N(0, I) from the layer's seed generator unless the
    caller passes its own draw (run()'s exactly resumable training)."""

    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.built = True  # no weights to build; the VAE may save its state before it first samples

    def call(self, z_mean, z_log_var, epsilon=None):
        if epsilon is None:
            epsilon = keras.random.normal(ops.shape(z_mean), dtype=z_mean.dtype, seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * epsilon

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


ENCODER_FILTERS = (32, 64)  # per resolution level, 14x14 and 7x7; the decoder mirrors them


def build_encoder(config: Config) -> keras.Model:
    """Image -> (z_mean, z_log_var): stride-2 convolutions (each followed by encoder_depth - 1 stride-1
    ones) and a dense layer. The VAE draws z (see VAE.sampling)."""
    inputs = keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), name="noisy_image")
    x = inputs
    for width in ENCODER_FILTERS:
        x = layers.Conv2D(width, 3, strides=2, padding="same", activation="relu")(x)
        for _ in range(config.encoder_depth - 1):
            x = layers.Conv2D(width, 3, padding="same", activation="relu")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(config.hidden_units, activation="relu")(x)
    # float32 heads: exp(z_log_var) and the KL stay accurate under mixed precision
    z_mean = layers.Dense(config.latent_dim, name="z_mean", dtype="float32")(x)
    z_log_var = layers.Dense(config.latent_dim, name="z_log_var", dtype="float32")(x)
    return keras.Model(inputs, [z_mean, z_log_var], name="encoder")


def subpixel_logits(x):
    """28x28x1 logits from 14x14 features: a 3x3 convolution to 4 channels, each one pixel of a 2x2
    block, and a pixel shuffle (depth_to_space) in plain Keras layers, so decoder.keras loads anywhere."""
    half = IMAGE_SIZE // 2
    x = layers.Conv2D(4, 3, padding="same")(x)  # channel 2*dy + dx: pixel (2i + dy, 2j + dx)
    x = layers.Reshape((half, half, 2, 2))(x)
    x = layers.Permute((1, 3, 2, 4))(x)
    return layers.Reshape((IMAGE_SIZE, IMAGE_SIZE, 1), name="logits")(x)


def build_decoder(config: Config) -> keras.Model:
    """z -> image: the mirror of the encoder, ending in a named 'logits' layer and its sigmoid (training
    uses the stabler BCE-from-logits). output_layer "conv": a last transposed convolution to 28x28x32 and a
    3x3 convolution to one channel; "subpixel": subpixel_logits() at 14x14."""
    filters = ENCODER_FILTERS[::-1]
    latent = keras.Input(shape=(config.latent_dim,), name="z")
    x = layers.Dense(config.hidden_units, activation="relu")(latent)
    x = layers.Dense(7 * 7 * filters[0], activation="relu")(x)
    x = layers.Reshape((7, 7, filters[0]))(x)
    levels = filters[:-1] if config.output_layer == "subpixel" else filters
    for width in levels:
        x = layers.Conv2DTranspose(width, 3, strides=2, padding="same", activation="relu")(x)
        for _ in range(config.decoder_depth - 1):
            x = layers.Conv2D(width, 3, padding="same", activation="relu")(x)
    if config.output_layer == "subpixel":
        logits = subpixel_logits(x)
    else:
        logits = layers.Conv2D(1, 3, padding="same", name="logits")(x)
    image = layers.Activation("sigmoid", name="image", dtype="float32")(logits)
    return keras.Model(latent, image, name="decoder")


def reconstruction_loss(clean, logits):
    """Binary cross-entropy of the clean target against the decoder's logits,
    summed over the 784 pixels and averaged over the batch (nats per image)."""
    bce = ops.binary_crossentropy(clean, logits, from_logits=True)
    return ops.mean(ops.sum(bce, axis=(1, 2, 3)))


def kl_divergence(z_mean, z_log_var):
    """KL(N(z_mean, exp(z_log_var)) || N(0, I)), closed form, summed over latent dims."""
    kl = -0.5 * (1.0 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var))
    return ops.mean(ops.sum(kl, axis=1))


LOG_2PI = math.log(2.0 * math.pi)


def log_normal(z, mean, log_var):
    """log N(z; mean, diag(exp(log_var))) per latent dimension (not summed)."""
    return -0.5 * (ops.square(z - mean) * ops.exp(-log_var) + log_var + LOG_2PI)


def kl_monte_carlo(z, z_mean, z_log_var, prior_log_prob):
    """KL(q(z|x) || p(z)) estimated at the posterior sample z, one per image: log q(z|x) - log p(z),
    summed over latent dims, averaged over the batch. For a learned prior with no closed form."""
    log_q = ops.sum(log_normal(z, z_mean, z_log_var), axis=1)
    return ops.mean(log_q - prior_log_prob(z))


def supcon_loss(features, labels, temperature: float = 0.1):
    """Supervised contrastive loss (Khosla et al. 2020, L_out) of L2-normalised features: each anchor's
    log-probabilities over the other samples, averaged over its positives (same label). Anchors without a
    positive are left out; a batch without any positive pair gives 0, not NaN."""
    features = ops.cast(features, "float32")
    norm = ops.sqrt(ops.sum(ops.square(features), axis=1, keepdims=True) + 1e-12)
    unit = features / norm
    logits = ops.matmul(unit, ops.transpose(unit)) / temperature
    batch = ops.shape(features)[0]
    is_self = ops.cast(ops.eye(batch), "bool")
    logits = ops.where(is_self, -1e9, logits)
    log_prob = logits - ops.logsumexp(logits, axis=1, keepdims=True)
    labels = ops.reshape(labels, (-1,))
    positive = ops.logical_and(ops.equal(labels[:, None], labels[None, :]), ops.logical_not(is_self))
    n_positive = ops.sum(ops.cast(positive, "float32"), axis=1)
    sum_log_prob = ops.sum(ops.where(positive, log_prob, 0.0), axis=1)
    has_positive = n_positive > 0
    per_anchor = -sum_log_prob / ops.maximum(n_positive, 1.0)
    n_anchors = ops.sum(ops.cast(has_positive, "float32"))
    return ops.sum(ops.where(has_positive, per_anchor, 0.0)) / ops.maximum(n_anchors, 1.0)


def supcon_weight(recon, supcon, gamma_sc: float, scale: str = "recon"):
    """The factor SupCon is multiplied by in the total loss. "none": gamma_sc, in raw nats (the original's).
    "recon": gamma_sc * recon / SupCon, constant in the gradient, so the term is gamma_sc times the
    reconstruction term; the divisor is floored at 1 nat so that a nearly solved batch cannot blow it up."""
    if scale == "none":
        return gamma_sc
    return gamma_sc * ops.stop_gradient(recon / ops.maximum(supcon, 1.0))


def warmup_beta(epoch, beta_max: float, warmup_epochs: int):
    """Linear KL warm-up: beta_max * min(1, (epoch + 1) / warmup_epochs), a float32 scalar. `epoch` counts
    from 0, so beta reaches beta_max in epoch `warmup_epochs` (1-based) and is never 0."""
    if warmup_epochs <= 0:
        return ops.convert_to_tensor(beta_max, "float32")
    return beta_max * ops.minimum(1.0, ops.cast(epoch + 1, "float32") / warmup_epochs)


@keras.saving.register_keras_serializable(package="vae_fashion")
class MixturePrior(layers.Layer):
    """The learned prior (VAE_PRIOR=mixture) p(z) = sum_k w_k N(z; mu_k, diag(sigma_k^2)), w = softmax(logits).
    It starts as N(0, I); FitPrior fits it to the aggregate posterior before epoch 2, and from then on the KL
    term's gradient trains it with the model."""

    def __init__(self, latent_dim: int, components: int, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.logits = self.add_weight(shape=(components,), initializer="zeros", name="logits")
        self.means = self.add_weight(shape=(components, latent_dim), initializer="zeros", name="means")
        self.log_vars = self.add_weight(shape=(components, latent_dim), initializer="zeros", name="log_vars")
        self.built, self.fitted = True, False  # fitted: by fit(), once; a later VAE.fit keeps the trained prior

    def log_prob(self, z):
        """log p(z) for a batch of latents (batch, latent_dim) -> (batch,)."""
        per_component = ops.sum(log_normal(ops.cast(z, "float32")[:, None, :], self.means, self.log_vars), axis=-1)
        return ops.logsumexp(ops.log_softmax(self.logits)[None, :] + per_component, axis=1)

    def set_parameters(self, weights: np.ndarray, means: np.ndarray, variances: np.ndarray) -> None:
        self.logits.assign(np.log(weights).astype(np.float32))
        self.means.assign(np.asarray(means, np.float32))
        self.log_vars.assign(np.log(variances).astype(np.float32))

    def fit(self, latents: np.ndarray, seed: int) -> None:
        """Set the components to a diagonal Gaussian mixture fitted by EM to `latents`."""
        from sklearn.mixture import GaussianMixture  # here: the rest of sections 1-4 needs only TensorFlow and Keras

        mixture = GaussianMixture(len(self.logits.numpy()), covariance_type="diag", random_state=seed).fit(latents)
        self.set_parameters(mixture.weights_, mixture.means_, mixture.covariances_)
        self.fitted = True

    def parameters(self) -> dict:
        """weights, means and variances as numpy arrays (what prior.npz holds)."""
        logits = self.logits.numpy().astype(np.float64)
        weights = np.exp(logits - logits.max())
        return {"weights": weights / weights.sum(), "means": self.means.numpy(),
                "variances": np.exp(self.log_vars.numpy())}


def full_covariances(parameters: dict) -> np.ndarray:
    """A mixture's full "covariances", or its diagonal "variances" (MixturePrior.parameters()) as full ones."""
    if "covariances" in parameters:
        return parameters["covariances"]
    variances = parameters["variances"]
    return variances[:, :, None] * np.eye(variances.shape[1], dtype=variances.dtype)


def sample_mixture(parameters: dict, n: int, rng) -> np.ndarray:
    """n latents from a Gaussian mixture: a component by its weight, then a draw from it. `parameters`
    holds weights, means, and full "covariances" or diagonal "variances" (see full_covariances)."""
    component = rng.choice(len(parameters["weights"]), size=n, p=parameters["weights"])
    means, factors = parameters["means"][component], np.linalg.cholesky(full_covariances(parameters)[component])
    return (means + np.einsum("nij,nj->ni", factors, rng.standard_normal(means.shape))).astype(np.float32)


# The loss terms in the order of history.csv; train_step reports them and beta, one value per epoch.
LOSS_TERMS = ("total_loss", "recon_loss", "kl_loss", "supcon_loss")
HISTORY_COLUMNS = ["epoch", *LOSS_TERMS, "beta"]


class VAE(keras.Model):
    """Denoising VAE trained on BCE + beta * KL + gamma_sc * w * SupCon(z_mean) (supcon_weight) by
    fit(noisy, (clean, labels)) at any batch size. Its uses take numpy batches of any size: encode() gives
    (z_mean, z_log_var), denoise() decoder(z_mean(noisy)), generate() decodes latents, sample_generator()
    draws from the generator."""

    def __init__(self, encoder, decoder, config: Config, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.decoder = decoder
        self.sampling = Sampling(seed=seed_for(config, "posterior"), name="z")
        # None: the standard normal, whose KL has a closed form
        self.prior = MixturePrior(config.latent_dim, config.prior_components, name="prior") if (
            config.prior == "mixture") else None
        self.decoder_logits = keras.Model(decoder.input, decoder.get_layer("logits").output)
        self.generator = None  # the mixture fitted to the training z_mean after training (fit_generator)
        self.config = config
        # beta's epoch length and the learning-rate schedule (build_vae's), which fit() sets (FitSchedule)
        self.steps_per_epoch, self.schedule = 1, None
        self.trackers = {name: keras.metrics.Mean(name=name) for name in HISTORY_COLUMNS[1:]}

    @property
    def metrics(self):
        return list(self.trackers.values())  # listed here so that Keras resets them every epoch

    def fit(self, x=None, y=None, *args, callbacks=None, **kwargs):
        """Keras' fit, with FitSchedule, and FitPrior on the noisy images x unless the caller passes one (run()
        does). A fit that continues training passes initial_epoch, so that the schedule spans both."""
        callbacks = [FitSchedule(), *(callbacks or [])]
        if self.prior is not None and not any(isinstance(callback, FitPrior) for callback in callbacks):
            if not isinstance(x, np.ndarray):
                raise ValueError("the mixture prior is fitted to the noisy training images: pass them to fit() as "
                                 "an array, or pass callbacks=[FitPrior(noisy_images, config)]")
            callbacks.insert(1, FitPrior(x, self.config))
        return super().fit(x, y, *args, callbacks=callbacks, **kwargs)

    def call(self, noisy, training=False):
        z_mean, _z_log_var = self.encoder(noisy, training=training)
        return self.decoder(z_mean, training=training)

    def encode(self, images: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        return tuple(self.encoder.predict(images, batch_size=batch_size, verbose=0))

    def denoise(self, noisy: np.ndarray) -> np.ndarray:
        """decoder(z_mean(noisy)): the posterior's mean, decoded, is the denoised image."""
        return self.generate(self.encode(noisy)[0])

    def generate(self, latents: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        return self.decoder.predict(np.asarray(latents, dtype=np.float32), batch_size=batch_size, verbose=0)

    def sample_prior(self, n: int, seed: int) -> np.ndarray:
        """n latents from the prior the KL trains against: N(0, I), or the learned mixture."""
        rng = np.random.default_rng(seed)
        if self.prior is None:
            return rng.standard_normal((n, self.decoder.input.shape[-1])).astype(np.float32)
        return sample_mixture(self.prior.parameters(), n, rng)

    def sample_generator(self, n: int, seed: int) -> np.ndarray:
        """n latents to decode: from the generator once one is fitted, else from the prior."""
        if self.generator is None:
            return self.sample_prior(n, seed)
        return sample_mixture(self.generator, n, np.random.default_rng(seed))

    def beta(self):
        """The KL weight of the current epoch (warmup_beta), from the optimizer's step count and fit's epochs."""
        epoch = self.optimizer.iterations // self.steps_per_epoch
        return warmup_beta(epoch, self.config.beta_max, self.config.warmup_epochs)

    def compute_losses(self, noisy, clean, labels, epsilon=None, training=False) -> dict:
        """The loss terms of one batch (LOSS_TERMS) and beta; epsilon: the posterior sample's noise."""
        z_mean, z_log_var = self.encoder(noisy, training=training)
        z = self.sampling(z_mean, z_log_var, epsilon)
        # the logits (and z) are in the layers' precision, float16 or bfloat16 under mixed precision
        logits = ops.cast(self.decoder_logits(z, training=training), "float32")
        recon = reconstruction_loss(clean, logits)
        if self.prior is None:
            kl = kl_divergence(z_mean, z_log_var)
        else:
            kl = kl_monte_carlo(ops.cast(z, "float32"), z_mean, z_log_var, self.prior.log_prob)
        supcon, weight = self.supcon_term(z_mean, labels, recon)
        beta = self.beta()
        total = recon + beta * kl + weight * supcon
        return {**dict(zip(LOSS_TERMS, (total, recon, kl, supcon), strict=True)), "beta": beta}

    def supcon_term(self, z_mean, labels, recon):
        """SupCon of the batch's z_mean and its weight in the total loss (supcon_weight)."""
        supcon = supcon_loss(z_mean, labels, self.config.supcon_temperature)
        return supcon, supcon_weight(recon, supcon, self.config.gamma_sc, self.config.supcon_scale)

    def train_step(self, data):
        noisy, (clean, labels) = data
        with tf.GradientTape() as tape:
            losses = self.compute_losses(noisy, clean, labels, training=True)
            # the identity unless mixed_float16 trains through a LossScaleOptimizer (as in Keras' own train_step)
            objective = self.optimizer.scale_loss(losses["total_loss"])
        grads = tape.gradient(objective, self.trainable_weights)
        self.optimizer.apply(grads, self.trainable_weights)
        return self.track(losses)

    def track(self, losses: dict) -> dict:
        for name, value in losses.items():
            self.trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self.trackers.items()}


# =============================================================================
# 3. Data and noise
# =============================================================================


@dataclasses.dataclass(frozen=True)
class FashionMNIST:
    x_train: np.ndarray  # float32 (N, 28, 28, 1) in [0, 1]
    y_train: np.ndarray  # int32 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    x_train_noisy: np.ndarray | None = None  # the fixed noisy copies, added by with_noise()
    x_test_noisy: np.ndarray | None = None


def to_unit_float(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 28, 28, 1) in [0, 1]."""
    return (images.astype(np.float32) / 255.0)[..., None]


def add_noise(images: np.ndarray, noise_factor: float, seed: int) -> np.ndarray:
    """x_noisy = clip(x + noise_factor * N(0, 1), 0, 1), drawn once from a seeded generator."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(images.shape, dtype=np.float32)
    return np.clip(images + np.float32(noise_factor) * noise, 0.0, 1.0)


def with_noise(data: FashionMNIST, config: Config) -> FashionMNIST:
    """The data with one fixed noisy copy of each split: every test figure is measured on the test copy;
    the training copy is what fresh_noise=0 trains on, and what the latent-space probes encode."""
    return dataclasses.replace(
        data, x_train_noisy=add_noise(data.x_train, config.noise_factor, seed_for(config, "train_noise_fixed")),
        x_test_noisy=add_noise(data.x_test, config.noise_factor, seed_for(config, "test_noise")))


# =============================================================================
# 4. Training: vae.fit(noisy, (clean, labels)); run() adds devices, exact resume and fresh noise (appendix)
# =============================================================================


def learning_rate_schedule(config: Config, decay_steps: int = 1):
    """Adam's learning rate: constant, or a cosine decay to 5 % of it over decay_steps (for the VAE, FitSchedule
    sets them to the steps of fit)."""
    if config.lr_schedule == "constant":
        return config.learning_rate
    return keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=decay_steps, alpha=0.05)


def build_vae(config: Config, jit_compile="auto", model_class=VAE) -> VAE:
    """The compiled VAE (or a subclass of it), its weights seeded by VAE_SEED."""
    keras.utils.set_random_seed(config.seed)
    vae = model_class(build_encoder(config), build_decoder(config), config, name="vae")
    vae.schedule = learning_rate_schedule(config)
    optimizer = keras.optimizers.Adam(learning_rate=vae.schedule)
    vae.compile(optimizer=optimizer, jit_compile=jit_compile)
    vae(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1), np.float32))  # build: fit, checkpoints and load_weights need it
    # the optimizer's variables now, not in fit's first trace: variables made while tracing cost a second trace
    vae.optimizer.build(vae.trainable_variables)
    return vae


class FitSchedule(keras.callbacks.Callback):
    """Before fit trains, sets beta's epoch length and the cosine schedule's decay steps from Keras' own count of
    fit's steps, so that both follow the epochs fit runs, at any batch size."""

    def on_train_begin(self, logs=None):
        steps = self.params.get("steps")
        if not steps:
            raise ValueError("fit() needs a known number of steps per epoch: pass steps_per_epoch")
        schedule, decay_steps = self.model.schedule, max(1, steps * self.params["epochs"])
        if steps != self.model.steps_per_epoch or getattr(schedule, "decay_steps", decay_steps) != decay_steps:
            self.model.steps_per_epoch = steps
            if isinstance(schedule, keras.optimizers.schedules.CosineDecay):
                schedule.decay_steps = decay_steps
            self.model.make_train_function(force=True)  # the training step takes both in when it is traced


class FitPrior(keras.callbacks.Callback):
    """Before the second epoch, fits the mixture prior to one posterior sample of each of PRIOR_FIT_SAMPLES
    seeded noisy training images (a resumed run past it has the fitted prior in its checkpoint)."""

    def __init__(self, noisy: np.ndarray, config: Config):
        super().__init__()
        self.noisy, self.config = noisy, config

    def on_epoch_begin(self, epoch, logs=None):
        if epoch != 1 or self.model.prior is None or self.model.prior.fitted:  # epoch counts from 0
            return
        seed = seed_for(self.config, "prior_fit")
        rng = np.random.default_rng(seed)
        subset = seeded_subset(len(self.noisy), PRIOR_FIT_SAMPLES, rng)
        z_mean, z_log_var = self.model.encode(self.noisy[subset])
        latents = z_mean + np.exp(0.5 * z_log_var) * rng.standard_normal(z_mean.shape).astype(np.float32)
        self.model.prior.fit(latents, seed)


# =============================================================================
# 5. Analysis: every number and every image set of the outputs (analyse() at the end)
# =============================================================================

# here: sections 1-4 need none of these
import pandas as pd  # noqa: E402
from scipy import linalg  # noqa: E402
from skimage.metrics import peak_signal_noise_ratio, structural_similarity  # noqa: E402
from skimage.restoration import denoise_nl_means, denoise_tv_chambolle  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from sklearn.metrics import silhouette_score  # noqa: E402
from sklearn.mixture import GaussianMixture  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

CLASS_NAMES_EN = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]
CLASS_NAMES_TR = ["Tişört/Üst", "Pantolon", "Kazak", "Elbise", "Ceket", "Sandalet", "Gömlek", "Spor Ayakkabı",
                  "Çanta", "Bilek Bot"]
# Seeded subsets (see seeded_subset):
SILHOUETTE_SAMPLES = 5000  # test z_mean scored by the silhouette (O(n^2) distances)
ROBUSTNESS_SAMPLES = 1000  # test images denoised at every noise level of 13_noise_robustness.png
EXPOST_FIT_SAMPLES = 20_000  # training z_mean the generator's mixture is fitted to after training
CONDITIONAL_FIT_SAMPLES = 2000  # training z_mean of a class its mixture is fitted to (docs/RESULTS.md)
SEED_OFFSETS |= {  # the analysis's random streams (seed_for)
    "prior_grid": 2, "prior_fd": 3, "classical_subset": 4, "training_codes": 5, "conditional": 6,
    "robustness_subset": 7, "silhouette_subset": 9, "embed_subset": 10, "tsne": 11, "umap": 12, "expost_fit": 13,
    "interpolation_pairs": 14, "classifier": 15, "trained_prior_grid": 18, "trained_prior_fd": 19,
    "scatter_order": 16, "conditional_fit": 20, "robustness_noise": 1000}  # robustness_noise: + the level's index

QUALITY_COLUMNS = ("mse", "psnr", "ssim")


def image_quality(reference: np.ndarray, images: np.ndarray) -> pd.DataFrame:
    """Per-image MSE, PSNR (dB) and SSIM against the clean reference, data_range=1."""
    ref = reference.reshape(len(reference), IMAGE_SIZE, IMAGE_SIZE).astype(np.float64)
    img = images.reshape(len(images), IMAGE_SIZE, IMAGE_SIZE).astype(np.float64)
    mse = np.mean((ref - img) ** 2, axis=(1, 2))
    with np.errstate(divide="ignore"):
        psnr = np.array([peak_signal_noise_ratio(r, i, data_range=1.0) for r, i in zip(ref, img)])
    ssim = np.array([structural_similarity(r, i, data_range=1.0) for r, i in zip(ref, img)])
    return pd.DataFrame({"mse": mse, "psnr": psnr, "ssim": ssim})


def quality_means(per_method: dict[str, pd.DataFrame]) -> dict:
    """{method}_{mse,psnr,ssim,psnr_pooled} as QUALITY_DEFINITIONS defines them (every image has 784 pixels,
    so the pooled MSE is the mean of the per-image MSEs)."""
    means = {}
    for method, quality in per_method.items():
        means.update({f"{method}_{column}": float(quality[column].mean()) for column in QUALITY_COLUMNS})
        with np.errstate(divide="ignore"):
            means[f"{method}_psnr_pooled"] = float(10.0 * np.log10(1.0 / quality["mse"].mean()))
    return means


def denoising_summary(quality: dict[str, pd.DataFrame]) -> dict:
    """Means over the test images of the noisy input, the VAE, and the VAE given clean inputs (a
    reference), and the gains of the VAE over the noisy input."""
    summary = quality_means(quality)
    baseline = summary["noisy_mse"]
    summary["mse_improvement_pct"] = (
        100.0 * (1.0 - summary["vae_mse"] / baseline) if baseline > 0 else float("nan")
    )
    summary["psnr_gain_db"] = summary["vae_psnr"] - summary["noisy_psnr"]
    summary["ssim_gain"] = summary["vae_ssim"] - summary["noisy_ssim"]
    return summary


def representation_quality(z_train, y_train, z_test, y_test, seed: int, silhouette_samples: int = SILHOUETTE_SAMPLES):
    """Linear probe, kNN accuracy and silhouette of z_mean against the class labels."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    probe.fit(z_train, y_train)
    knn = KNeighborsClassifier(n_neighbors=min(10, len(z_train)), n_jobs=-1).fit(z_train, y_train)
    subset = seeded_subset(len(z_test), silhouette_samples, seed, in_order=False)  # the score's digits depend on it
    silhouette = (
        silhouette_score(z_test[subset], y_test[subset])
        if len(np.unique(y_test[subset])) > 1
        else float("nan")
    )
    return {
        "linear_probe_accuracy": float(probe.score(z_test, y_test)),
        "knn10_accuracy": float(knn.score(z_test, y_test)),
        "silhouette": float(silhouette),
        "silhouette_samples": int(len(subset)),
    }


def evaluate(vae: VAE, data: FashionMNIST, config: Config) -> dict:
    """The denoising and latent-space fields of Results: the test set denoised by decoder(z_mean) and
    scored, the same model given the clean test images (a reference, not a bound: the encoder was
    trained on noisy inputs), and the latent space scored."""
    z_mean_test, _ = vae.encode(data.x_test_noisy)
    denoised = vae.generate(z_mean_test)
    z_mean_train, _ = vae.encode(data.x_train_noisy)
    z_mean_clean, _ = vae.encode(data.x_test)
    quality = {"noisy": image_quality(data.x_test, data.x_test_noisy), "vae": image_quality(data.x_test, denoised),
               "clean_input": image_quality(data.x_test, vae.generate(z_mean_clean))}
    representation = representation_quality(z_mean_train, data.y_train, z_mean_test, data.y_test,
                                            seed_for(config, "silhouette_subset"))
    return {"denoised": denoised, "quality": quality, "z_mean_train": z_mean_train, "z_mean_test": z_mean_test,
            "representation": representation}


# Training-free references. Parameters picked on 200 noisy *training* images (sigma 0.45)
# from a small grid; see docs/RESULTS.md.
TV_WEIGHT = 0.2
NLM_PARAMS = {"patch_size": 3, "patch_distance": 2, "fast_mode": True}
NLM_H_OVER_SIGMA = 0.15
CLASSICAL_DENOISERS = {
    "tv_chambolle": f"skimage.restoration.denoise_tv_chambolle(noisy, weight={TV_WEIGHT})",
    "nl_means": f"skimage.restoration.denoise_nl_means(noisy, h={NLM_H_OVER_SIGMA}*sigma, sigma=noise_factor, "
    + ", ".join(f"{k}={v}" for k, v in NLM_PARAMS.items()) + ")",
}


def denoise_tv(noisy: np.ndarray) -> np.ndarray:
    """The TV reference denoiser, image by image: (N, 28, 28, 1) -> (N, 28, 28)."""
    return np.stack([denoise_tv_chambolle(x, weight=TV_WEIGHT) for x in noisy[..., 0].astype(np.float64)])


def classical_references(clean, noisy, denoised, config: Config) -> dict:
    """PSNR/SSIM/MSE of two training-free denoisers, and of the VAE, on one seeded test subset."""
    subset = seeded_subset(len(clean), config.classical_samples, seed_for(config, "classical_subset"))
    images = noisy[subset, ..., 0].astype(np.float64)
    sigma = max(config.noise_factor, 1e-3)
    outputs = {
        "tv_chambolle": denoise_tv(noisy[subset]),
        "nl_means": np.stack(
            [denoise_nl_means(x, h=NLM_H_OVER_SIGMA * sigma, sigma=sigma, **NLM_PARAMS) for x in images]
        ),
        "vae_subset": denoised[subset],
        "noisy_subset": noisy[subset],
    }
    per_method = {method: image_quality(clean[subset], output) for method, output in outputs.items()}
    return {"classical_samples": int(len(subset)), **quality_means(per_method)}


def build_classifier(seed: int) -> keras.Model:
    """A small CNN; its 64-d 'features' layer plays the role Inception plays in FID."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE, 1))
    x = layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    features = layers.Dense(64, activation="relu", name="features")(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32")(features)
    model = keras.Model(inputs, outputs, name="fashion_classifier")
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of two feature sets."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    # Dead ReLU units make the covariances singular; a tiny ridge keeps sqrtm well defined.
    ridge = 1e-6 * np.eye(len(cov_a))
    cov_a, cov_b = cov_a + ridge, cov_b + ridge
    root = linalg.sqrtm(cov_a @ cov_b)
    if np.iscomplexobj(root):
        root = root.real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2.0 * root))


def normalised_entropy(counts: np.ndarray) -> float:
    """Shannon entropy of a class histogram divided by log(classes): 1 = uniform."""
    p = np.asarray(counts, np.float64) / max(1, np.sum(counts))
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / np.log(NUM_CLASSES))


def fit_generator(z_train: np.ndarray, components: int, seed: int, size: int = EXPOST_FIT_SAMPLES) -> dict:
    """The generator: a full-covariance Gaussian mixture fitted by EM to `size` seeded training z_mean after
    training (the ex-post density of Ghosh et al. 2020); its weights, means and covariances, as sample_mixture()
    takes them."""
    codes = z_train[seeded_subset(len(z_train), size, seed)]
    mixture = GaussianMixture(components, covariance_type="full", random_state=seed).fit(codes)
    return {"weights": mixture.weights_, "means": mixture.means_, "covariances": mixture.covariances_}


def class_mixtures(z_train, y_train, components: int, seed: int, size: int = CONDITIONAL_FIT_SAMPLES) -> dict:
    """Class -> the generator's kind of mixture (fit_generator) fitted to `size` of that class's training z_mean, for
    every class with two or more."""
    fitted = {}
    for c in range(NUM_CLASSES):
        codes = z_train[y_train == c]
        if len(codes) > 1:
            most = min(len(codes), size) // (codes.shape[1] + 1)  # a full covariance needs latent_dim + 1 codes
            fitted[c] = fit_generator(codes, max(1, min(components, most)), seed, size)
    return fitted


def class_conditional_latents(mixtures: dict, counts, seed: int):
    """counts[c] latents from the mixture of each class c of class_mixtures(): (latents, intended labels)."""
    rng = np.random.default_rng(seed)
    latents = [sample_mixture(mixture, counts[c], rng) for c, mixture in mixtures.items()]
    return np.concatenate(latents), np.repeat(list(mixtures), [counts[c] for c in mixtures])


def generation_quality(vae: VAE, data: FashionMNIST, config: Config, z_mean_train, mixtures: dict, denoised,
                       epochs: int = 3) -> dict:
    """A small classifier's accuracy; Fréchet distances to the clean test images (same N for every
    set) of reconstructions, of the generator's samples, of the trained prior's, of the class mixtures' (as many
    samples of a class as it has test images) and of the training codes decoded (the limit of any density of
    z_mean); the classes of the samples; per class, how often the classifier agrees with the intended class, and
    the Fréchet distances of its samples and of its reconstructions to its test images."""
    classifier = build_classifier(seed_for(config, "classifier"))
    classifier.fit(data.x_train, data.y_train, batch_size=256, epochs=epochs, verbose=0)
    # one pass per image set gives both the features and the class probabilities
    two_heads = keras.Model(classifier.input, [classifier.get_layer("features").output, classifier.output])
    n = min(len(data.x_test), len(data.x_train))
    samples = vae.generate(vae.sample_generator(n, seed_for(config, "prior_fd")))
    trained_prior = vae.generate(vae.sample_prior(n, seed_for(config, "trained_prior_fd")))
    codes = z_mean_train[seeded_subset(len(z_mean_train), n, seed_for(config, "training_codes"))]
    class_images = np.bincount(data.y_test[:n], minlength=NUM_CLASSES)
    latents, intended = class_conditional_latents(mixtures, class_images, seed_for(config, "conditional"))

    def features_and_probs(images):
        return two_heads.predict(images[:n], batch_size=1024, verbose=0)

    reference, _ = features_and_probs(data.x_test)
    # "prior" names the generator's samples in the metrics, as in the original's 07_generated_prior.png
    sets = {name: features_and_probs(images) for name, images in (
        ("train", data.x_train), ("reconstruction", denoised), ("prior", samples), ("noisy", data.x_test_noisy),
        ("trained_prior", trained_prior), ("conditional", vae.generate(latents)),
        ("training_codes", vae.generate(codes)))}
    result = {
        "classifier_test_accuracy": float(classifier.evaluate(data.x_test, data.y_test, verbose=0)[1]),
        "fd_clean_train": frechet_distance(sets["train"][0], reference),
        "fd_vae_reconstruction": frechet_distance(sets["reconstruction"][0], reference),
        "fd_prior_samples": frechet_distance(sets["prior"][0], reference),
        "fd_noisy_input": frechet_distance(sets["noisy"][0], reference),
        "fd_trained_prior_samples": frechet_distance(sets["trained_prior"][0], reference),
        "fd_training_codes": frechet_distance(sets["training_codes"][0], reference),
        "fd_conditional_samples": frechet_distance(sets["conditional"][0], reference),
        "fd_samples": n,
        "class_images": class_images.tolist(),
    }
    for name in ("prior", "trained_prior"):
        probs = sets[name][1]
        counts = np.bincount(probs.argmax(axis=1), minlength=NUM_CLASSES)
        result.update({f"{name}_class_entropy": normalised_entropy(counts),
                       f"{name}_mean_confidence": float(probs.max(axis=1).mean()),
                       f"{name}_class_counts": counts.tolist()})
    conditional_features, predicted = sets["conditional"][0], sets["conditional"][1].argmax(axis=1)
    result["conditional_agreement"] = float(np.mean(predicted == intended))
    # the reference: how often the classifier recognises the VAE's reconstructions of real test images
    result["reconstruction_agreement"] = float(np.mean(sets["reconstruction"][1].argmax(axis=1) == data.y_test[:n]))
    for c in range(NUM_CLASSES):
        mine, theirs = intended == c, data.y_test[:n] == c
        result[f"conditional_agreement_{c}"] = float(np.mean(predicted[mine] == c)) if mine.any() else float("nan")
        for name, features in (("conditional", conditional_features[mine]),
                               ("reconstruction", sets["reconstruction"][0][theirs])):
            result[f"fd_{name}_{c}"] = (frechet_distance(features, reference[theirs])
                                        if len(features) > 1 and theirs.sum() > 1 else float("nan"))
    return result


ROBUSTNESS_SIGMAS = (0.1, 0.2, 0.3, 0.45, 0.6, 0.8)


def noise_robustness(denoise, clean: np.ndarray, config: Config, sigmas=ROBUSTNESS_SIGMAS,
                     size: int = ROBUSTNESS_SAMPLES):
    """PSNR / SSIM / MSE of the noisy input, the TV reference and `denoise` (the VAE, trained at one
    noise level) on a fixed seeded test subset, for every noise level in `sigmas`: one row per
    method and sigma."""
    x = clean[seeded_subset(len(clean), size, seed_for(config, "robustness_subset"))]
    rows = []
    for i, sigma in enumerate(sigmas):
        noisy = add_noise(x, sigma, seed_for(config, "robustness_noise") + i)
        for method, output in (("noisy input", noisy), ("TV (Chambolle)", denoise_tv(noisy)), ("VAE", denoise(noisy))):
            quality = image_quality(x, output)
            rows.append({"sigma": sigma, "method": method, "n_images": len(x),
                         **{column: float(quality[column].mean()) for column in QUALITY_COLUMNS}})
    return pd.DataFrame(rows)


def robustness_summary(table: pd.DataFrame) -> list[str]:
    """Where the VAE beats the TV reference, in PSNR and in SSIM, over the sigmas measured."""
    lines = []
    for column in ("psnr", "ssim"):
        wide = table.pivot(index="sigma", columns="method", values=column)
        wins = wide.index[wide["VAE"] > wide["TV (Chambolle)"]].tolist()
        if len(wins) == len(wide):
            verdict = f"the VAE beats TV at every sigma measured ({wide.index.min()}-{wide.index.max()})"
        elif not wins:
            verdict = "TV matches or beats the VAE at every sigma measured"
        else:
            losses = [s for s in wide.index if s not in wins]
            verdict = (f"the VAE beats TV at sigma {', '.join(map(str, wins))} and stops beating it at "
                       f"sigma {', '.join(map(str, losses))}")
        lines.append(f"{column.upper()}: {verdict}")
    return lines


def project_tsne(z: np.ndarray, seed: int) -> np.ndarray:
    perplexity = float(min(30.0, max(2.0, (len(z) - 1) / 3.0)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, n_jobs=-1)
    return tsne.fit_transform(z)


def import_umap():
    """(the umap module, None), or (None, why not); like the original notebook, a missing umap-learn is
    pip-installed once, its output captured, within 10 minutes."""
    try:
        import umap  # here: optional

        return umap, None
    except ImportError as error:
        reason = f"import umap failed ({error})"
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "umap-learn"], check=True, timeout=600,
                       capture_output=True)
        import umap

        return umap, None
    except Exception as error:  # noqa: BLE001 - any failure only skips one plot
        return None, reason + f"; pip install umap-learn failed ({type(error).__name__})"


def project_umap(z: np.ndarray, seed: int, umap_module) -> np.ndarray:
    n_neighbors = int(min(15, max(2, len(z) - 1)))
    reducer = umap_module.UMAP(n_neighbors=n_neighbors, min_dist=0.1, random_state=seed)
    return reducer.fit_transform(z)


TRAVERSAL_SPAN = 2.5  # standard deviations either side of the mean


def latent_traversal(pca: PCA, n_directions: int = 5, steps: int = 9, span: float = TRAVERSAL_SPAN):
    """Latents along the top principal directions of the fitted `pca`: mean + t * sd * direction, t from
    -span to +span. Returns (n_directions, steps, latent_dim) and the directions' variance ratios."""
    t = np.linspace(-span, span, steps)
    sd = np.sqrt(pca.explained_variance_[:n_directions])
    grid = pca.mean_[None, None, :] + (t[None, :, None] * sd[:, None, None]) * pca.components_[:n_directions, None, :]
    return grid.astype(np.float32), pca.explained_variance_ratio_[:n_directions]


def interpolate_latents(z_a: np.ndarray, z_b: np.ndarray, steps: int) -> np.ndarray:
    """(n_pairs, steps, latent_dim) points on the segments from z_a to z_b."""
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[None, :, None]
    return (1.0 - t) * z_a[:, None, :] + t * z_b[:, None, :]


def interpolation_pairs(labels: np.ndarray, n_pairs: int, seed: int) -> list[tuple[int, int]]:
    """Pairs of test indices from two different classes, seeded, taking the classes present in turn;
    DatasetError when the test images hold fewer than two classes."""
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(labels))
    if len(classes) < 2:
        raise DatasetError(f"the {len(labels)} test images hold only one class, and the interpolation (08) joins "
                           "two: use more test images (VAE_TEST_SAMPLES)")
    pairs = []
    for k in range(n_pairs):
        a_class, b_class = classes[k % len(classes)], classes[(k + 1) % len(classes)]
        pairs.append((int(rng.choice(np.flatnonzero(labels == a_class))),
                      int(rng.choice(np.flatnonzero(labels == b_class)))))
    return pairs


def latent_paths(vae: VAE, z_mean_test: np.ndarray, y_test: np.ndarray, pca: PCA, config: Config) -> dict:
    """The interpolation and traversal fields of Results: decoded straight lines between test images of
    two classes, and decoded steps along the top principal directions of z_mean."""
    pairs = interpolation_pairs(y_test, 8, seed_for(config, "interpolation_pairs"))
    a, b = (np.array(indices) for indices in zip(*pairs))
    steps = 10
    line_latents = interpolate_latents(z_mean_test[a], z_mean_test[b], steps)
    grid, ratios = latent_traversal(pca)
    return {
        "interpolation": vae.generate(line_latents.reshape(-1, config.latent_dim)).reshape(
            len(pairs), steps, IMAGE_SIZE, IMAGE_SIZE, 1),
        "interpolation_labels": [f"{CLASS_NAMES_TR[y_test[i]]} →\n{CLASS_NAMES_TR[y_test[j]]}" for i, j in pairs],
        "traversal": vae.generate(grid.reshape(-1, config.latent_dim)).reshape(*grid.shape[:2], IMAGE_SIZE,
                                                                                IMAGE_SIZE, 1),
        "traversal_ratios": ratios,
    }


def latent_embeddings(z_mean_test: np.ndarray, config: Config, stage) -> tuple[dict, list[str]]:
    """t-SNE and UMAP coordinates of a seeded test subset ({"t-SNE": ..., "UMAP": ...}, with the subset's
    indices under "subset"), and a warning when UMAP cannot be had; neither with embed_samples 0."""
    subset = seeded_subset(len(z_mean_test), config.embed_samples, seed_for(config, "embed_subset"))
    embeddings, warnings = {"subset": subset}, []
    if not config.embed_samples:
        return embeddings, warnings
    with stage("t-SNE"):
        embeddings["t-SNE"] = project_tsne(z_mean_test[subset], seed_for(config, "tsne"))
    with stage("UMAP"):
        umap_module, reason = import_umap()
        if umap_module is None:
            warnings.append(f"06C_latent_umap_text_tr.png was not written: {reason}")
            print(f"WARNING: UMAP skipped: {reason}", file=sys.stderr)
        else:
            embeddings["UMAP"] = project_umap(z_mean_test[subset], seed_for(config, "umap"), umap_module)
    return embeddings, warnings


@dataclasses.dataclass
class Results:
    """Every number and every image set the outputs need: render() and the reports read only this."""

    config: Config
    history: pd.DataFrame  # one row per training epoch (HISTORY_COLUMNS)
    source: str  # where the data came from
    n_train: int
    y_test: np.ndarray
    # denoising: the test set's noisy input, the VAE output, per-image quality of noisy / vae / clean_input
    x_test: np.ndarray
    x_test_noisy: np.ndarray
    denoised: np.ndarray
    quality: dict
    classical: dict  # the training-free denoisers on a seeded subset
    robustness: pd.DataFrame  # one row per method and noise level
    # latent space
    z_mean_train: np.ndarray
    z_mean_test: np.ndarray
    representation: dict
    pca_coords: np.ndarray
    pca_ratios: np.ndarray
    embeddings: dict  # "subset" (test indices), "t-SNE", "UMAP" (absent when umap-learn is missing)
    # generation and interpolation: decoded images, (rows, columns, 28, 28, 1)
    generated_grid: np.ndarray  # the generator's samples
    trained_prior_grid: np.ndarray
    conditional_grid: np.ndarray
    conditional_classes: np.ndarray
    interpolation: np.ndarray
    interpolation_labels: list
    traversal: np.ndarray
    traversal_ratios: np.ndarray
    generation: dict | None  # the Fréchet distances; None when gen_metrics is 0
    metrics: pd.DataFrame
    warnings: list


def analyse(vae: VAE, data: FashionMNIST, history: pd.DataFrame, config: Config,
            stage=lambda name: contextlib.nullcontext()) -> Results:
    """Every number and image of the outputs, stage by stage (each in `with stage(name)`, which run() times);
    nothing is drawn or written here."""
    with stage("evaluate"):
        evaluated = evaluate(vae, data, config)
    z_mean_train, z_mean_test = evaluated["z_mean_train"], evaluated["z_mean_test"]
    with stage("pca"):
        pca = PCA().fit(z_mean_test)  # every component: a full decomposition, no random draw
        pca_coords = pca.transform(z_mean_test)[:, :2]
    embeddings, warnings = latent_embeddings(z_mean_test, config, stage)
    if config.generator == "expost":
        with stage("density of the training codes"):
            vae.generator = fit_generator(z_mean_train, config.expost_components, seed_for(config, "expost_fit"))
    with stage("generation and interpolation"):
        generated_grid = vae.generate(vae.sample_generator(100, seed_for(config, "prior_grid")))
        trained_prior_grid = vae.generate(vae.sample_prior(100, seed_for(config, "trained_prior_grid")))
        paths = latent_paths(vae, z_mean_test, data.y_test, pca, config)
    with stage("class-conditional samples"):
        mixtures = class_mixtures(z_mean_train, data.y_train, config.conditional_components,
                                  seed_for(config, "conditional_fit"))
        latents, intended = class_conditional_latents(mixtures, [10] * NUM_CLASSES, seed_for(config, "conditional"))
        conditional_grid = vae.generate(latents).reshape(-1, 10, IMAGE_SIZE, IMAGE_SIZE, 1)
    with stage("classical references"):
        classical = classical_references(data.x_test, data.x_test_noisy, evaluated["denoised"], config)
    with stage("noise robustness"):
        robustness = noise_robustness(vae.denoise, data.x_test, config)
    generation = None
    if config.gen_metrics:
        with stage("generation quality"):
            generation = generation_quality(vae, data, config, z_mean_train, mixtures, evaluated["denoised"])
    metrics = metrics_table(denoising_summary(evaluated["quality"]), evaluated["representation"], len(data.x_test),
                            classical, generation)
    return Results(
        config=config, history=history, source=data.source, n_train=len(data.x_train), y_test=data.y_test,
        x_test=data.x_test,
        x_test_noisy=data.x_test_noisy, denoised=evaluated["denoised"], quality=evaluated["quality"],
        classical=classical, robustness=robustness, z_mean_train=z_mean_train, z_mean_test=z_mean_test,
        representation=evaluated["representation"], pca_coords=pca_coords,
        pca_ratios=pca.explained_variance_ratio_, embeddings=embeddings,
        generated_grid=generated_grid.reshape(10, 10, IMAGE_SIZE, IMAGE_SIZE, 1),
        trained_prior_grid=trained_prior_grid.reshape(10, 10, IMAGE_SIZE, IMAGE_SIZE, 1),
        conditional_grid=conditional_grid,
        conditional_classes=np.unique(intended), interpolation=paths["interpolation"],
        interpolation_labels=paths["interpolation_labels"], traversal=paths["traversal"],
        traversal_ratios=paths["traversal_ratios"], generation=generation, metrics=metrics, warnings=warnings)


# =============================================================================
# 6. Drawing: render() draws Results; nothing here runs the model or an analysis
# =============================================================================

import matplotlib  # noqa: E402 - here: sections 1-4 need none of it

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # files only, no window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402


def save_figure(fig, path: Path, show: bool = False, tight: bool = True) -> None:
    """Save at 120 dpi; tight=False keeps the whole canvas (title cards). In place, not atomically: a run
    that dies here has no metrics.csv, and the next run removes the file first (prepare_output_dir). A
    notebook shows the saved file: drawing the figure again for it took as long as saving it."""
    fig.savefig(path, dpi=120, bbox_inches="tight" if tight else None)
    plt.close(fig)
    if show:
        from IPython.display import Image, display  # here: only in a notebook

        display(Image(filename=str(path)))


def prior_label(config: Config, short: bool = False) -> str:
    """How titles and labels name the prior the KL trained against: the long form, or a short one."""
    if config.prior == "normal":
        return "prior N(0, I)" if short else "N(0, I)"
    return "trained prior" if short else f"a learned mixture of {config.prior_components} Gaussians"


def generator_label(config: Config, short: bool = False) -> str:
    """How titles and labels name the density the shown and saved samples come from (the generator)."""
    if config.generator == "prior":
        return prior_label(config, short)
    if short:
        return f"ex-post GMM ({config.expost_components})"
    return (f"a mixture of {config.expost_components} full-covariance Gaussians fitted to the training z_mean "
            "after training")


def plot_training_curve(history: pd.DataFrame, column: str, title: str, ylabel: str, path, show=False):
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["epoch"], history[column], marker="o", label=column)
    ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, show)


def plot_latent_scatter(coords, labels, title, path, class_names=None, axis_names=("dim 1", "dim 2"),
                        show=False, seed: int = 0):
    """Scatter of 2-D latent coordinates drawn in one seeded random order, so that no
    class is painted over another; the legend uses digits 0-9 or class names."""
    cmap = plt.get_cmap("tab10")
    order = np.random.default_rng(seed).permutation(len(labels))
    fig, ax = plt.subplots(figsize=(9, 6.5), layout="constrained")
    ax.scatter(coords[order, 0], coords[order, 1], s=5, alpha=0.7, c=cmap(np.asarray(labels)[order]))
    names = [str(c) for c in range(NUM_CLASSES)] if class_names is None else class_names
    handles = [Line2D([], [], ls="", marker="o", ms=7, color=cmap(c), label=names[c])
               for c in range(NUM_CLASSES) if np.any(labels == c)]
    ax.set(title=title, xlabel=axis_names[0], ylabel=axis_names[1])
    ax.legend(handles=handles, fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5), title="class")
    save_figure(fig, path, show)


def plot_images(images, title, path, row_labels=None, column_labels=None, show=False):
    """A grid of images (rows, columns, 28, 28, 1), optionally with a label per row and per column. One mosaic in
    one axes, as keras-io's VAE draws its grid: an axes per image takes seconds for a 10x10 grid."""
    n_rows, n_columns, height, width = images.shape[:4]
    gap = 2  # white pixels between the images
    padded = np.pad(images[..., 0], ((0, 0), (0, 0), (0, gap), (0, gap)), constant_values=1.0)
    mosaic = padded.transpose(0, 2, 1, 3).reshape(n_rows * (height + gap), n_columns * (width + gap))[:-gap, :-gap]
    size = (n_columns + (1.2 if row_labels else 0.0), n_rows + (0.8 if column_labels else 0.5))  # an inch per image
    fig, ax = plt.subplots(figsize=size, layout="constrained")
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([c * (width + gap) + (width - 1) / 2 for c in range(n_columns)], column_labels or [], fontsize=7)
    ax.set_yticks([r * (height + gap) + (height - 1) / 2 for r in range(n_rows)], row_labels or [], fontsize=7)
    ax.tick_params(length=0)
    ax.set_frame_on(False)
    fig.suptitle(title)
    save_figure(fig, path, show)


def draw_per_class_psnr(results: Results, paths, show=False) -> None:
    """Mean PSNR per class for the noisy input and the VAE output."""
    noisy_quality, vae_quality, labels = results.quality["noisy"], results.quality["vae"], results.y_test
    classes = [c for c in range(NUM_CLASSES) if np.any(labels == c)]
    noisy = [noisy_quality["psnr"][labels == c].mean() for c in classes]
    vae = [vae_quality["psnr"][labels == c].mean() for c in classes]
    x = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(10, 4.8))
    ax.bar(x - 0.2, noisy, 0.4, label="noisy input", color="#999999")
    bars = ax.bar(x + 0.2, vae, 0.4, label="VAE: decoder(z_mean)", color="#1f77b4")
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, [f"{CLASS_NAMES_TR[c]}\n({CLASS_NAMES_EN[c]})" for c in classes], fontsize=7)
    ax.set(title="Denoising quality per class (test set)", xlabel="class", ylabel="mean PSNR (dB)")
    ax.set_ylim(0, 1.25 * max(max(vae), max(noisy)))
    ax.legend(loc="upper left", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, paths[0], show)


def draw_generation_quality(results: Results, paths, show=False) -> None:
    """Fréchet distances of every image set, and the classes of the generator's and the trained prior's samples
    (the trained prior's once when it is the generator); nothing with gen_metrics 0."""
    generation, config = results.generation, results.config
    if generation is None:
        return
    generator_name = generator_label(config, short=True)
    trained_prior_name = prior_label(config, short=True) if config.generator == "expost" else None
    bars = {"fd_clean_train": ("clean train\n(real images)", "#2ca02c"),
            "fd_vae_reconstruction": ("VAE recon-\nstructions", "#1f77b4"),
            "fd_training_codes": ("training codes\ndecoded (limit)", "#17becf"),
            "fd_prior_samples": (generator_name.replace(" (", "\n("), "#ff7f0e"),
            "fd_trained_prior_samples": (trained_prior_name, "#9467bd"),
            "fd_conditional_samples": ("class-\nconditional", "#8c564b"),
            "fd_noisy_input": ("noisy test\n(worst case)", "#999999")}
    bars = {key: bar for key, bar in bars.items() if bar[0] is not None}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [1.2, 1]}, layout="constrained")
    drawn = ax.bar([name for name, _color in bars.values()], [generation[key] for key in bars],
                   color=[color for _name, color in bars.values()])
    ax.bar_label(drawn, fmt="%.2f", fontsize=8)
    ax.set_yscale("log")
    ax.set(title=f"Fréchet distance to clean test images (n={generation['fd_samples']}, classifier features)",
           ylabel="Fréchet distance (log scale, lower is better)",
           xlabel="per class: fd_conditional_<c> beside fd_reconstruction_<c> in metrics.csv")
    ax.tick_params(axis="x", labelsize=8)
    x = np.arange(NUM_CLASSES)
    histograms = [("prior", generator_name, "#ff7f0e")]
    if trained_prior_name is not None:
        histograms.append(("trained_prior", trained_prior_name, "#9467bd"))
    width = 0.8 / len(histograms)
    for i, (name, label, color) in enumerate(histograms):
        label = (f"{label}: entropy {generation[name + '_class_entropy']:.2f}, "
                 f"confidence {generation[name + '_mean_confidence']:.2f}")
        ax2.bar(x + (i - (len(histograms) - 1) / 2) * width, generation[f"{name}_class_counts"], width, color=color,
                label=label)
    ax2.axhline(generation["fd_samples"] / NUM_CLASSES, color="k", ls="--", lw=1, label="uniform")
    ax2.set_ylim(0, 1.45 * max(max(generation[f"{name}_class_counts"]) for name, _label, _color in histograms))
    ax2.set_xticks(x, CLASS_NAMES_TR, fontsize=7, rotation=45)
    ax2.set(title="Classes of the samples, as the classifier labels them", xlabel="predicted class", ylabel="count")
    ax2.legend(fontsize=8)
    save_figure(fig, paths[0], show)


def draw_noise_robustness(results: Results, paths, show=False) -> None:
    """PSNR and SSIM against the noise level, one line per method."""
    table, trained_sigma = results.robustness, results.config.noise_factor
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    for ax, column, label in zip(axes, ("psnr", "ssim"), ("mean PSNR (dB)", "mean SSIM")):
        for method, color in (("noisy input", "#999999"), ("TV (Chambolle)", "#2ca02c"), ("VAE", "#1f77b4")):
            rows = table[table["method"] == method]
            ax.plot(rows["sigma"], rows[column], marker="o", color=color, label=method)
        ax.axvline(trained_sigma, color="k", ls=":", lw=1, label=f"VAE trained at sigma {trained_sigma}")
        ax.set(xlabel="noise sigma", ylabel=label, title=f"{label} on {int(table['n_images'].iloc[0])} test images")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Noise robustness: x_noisy = clip(x + sigma*N(0,1), 0, 1)")
    save_figure(fig, paths[0], show)


TITLE_PANELS = [  # the original's title cards: file, title, subtitle
    ("A_title_denoising.png", "Denoising", "Gürültülü görüntü → temiz görüntü"),
    ("B_title_representation_learning.png", "Representation Learning",
     "Latent uzayda sınıf ayrışması (PCA / UMAP / t-SNE)"),
    ("C_title_generation.png", "Generation", "Prior, ex-post GMM ve sınıf-koşullu örnekleme"),
    ("D_title_interpolation.png", "Latent Interpolation", "Latent uzayda süreklilik"),
]


def draw_title_cards(results: Results, paths, show=False) -> None:
    """Framed 16:9 title cards, 1536x864 px; the whole canvas is kept (no tight crop)."""
    for path, (_name, title, subtitle) in zip(paths, TITLE_PANELS, strict=True):
        fig = plt.figure(figsize=(12.8, 7.2), facecolor="white")
        fig.patches.append(FancyBboxPatch((0.04, 0.06), 0.92, 0.88, boxstyle="round,pad=0,rounding_size=0.02",
                                          transform=fig.transFigure, fill=False, edgecolor="#1f77b4", linewidth=3))
        fig.text(0.5, 0.58, title, ha="center", va="center", fontsize=40, weight="bold")
        fig.text(0.5, 0.40, subtitle, ha="center", va="center", fontsize=18, color="#444444")
        fig.text(0.5, 0.12, "VAE on Fashion-MNIST", ha="center", fontsize=12, color="#888888")
        save_figure(fig, path, show, tight=False)


def draw_training_curves(results: Results, paths, show=False) -> None:
    config, history = results.config, results.history
    kl_title = f"KL divergence to the prior, {prior_label(config)}" + (
        " (Monte-Carlo estimate)" if config.prior == "mixture" else "")
    curves = [
        ("total_loss", "Training loss: total = recon + beta*KL + gamma_sc*w*SupCon", "nats per image"),
        ("recon_loss", "Reconstruction loss (BCE, clean vs recon, summed over pixels)", "nats per image"),
        ("kl_loss", kl_title, "nats per image"),
        ("supcon_loss", "Supervised contrastive loss on z_mean", "loss"),
        ("beta", f"KL weight beta: linear warm-up over {config.warmup_epochs} epochs", "beta"),
    ]
    for (column, title, ylabel), path in zip(curves, paths, strict=True):
        plot_training_curve(history, column, title, ylabel, path, show)


def draw_denoising_grid(results: Results, paths, show=False) -> None:
    labels = results.y_test
    columns = [int(np.flatnonzero(labels == c)[0]) for c in range(NUM_CLASSES) if np.any(labels == c)]  # a class each
    rows = np.stack([images[columns] for images in (results.x_test, results.x_test_noisy, results.denoised)])
    plot_images(rows, "Denoising: clean / noisy input / VAE output decoder(z_mean)", paths[0],
                ["Clean", "Noisy", "Denoised\n(VAE)"], [CLASS_NAMES_TR[labels[i]] for i in columns], show)


def draw_pca(results: Results, paths, show=False) -> None:
    """PCA of every test z_mean, with digits and with Turkish class names."""
    order_seed = seed_for(results.config, "scatter_order")
    ratios, labels, n = results.pca_ratios, results.y_test, len(results.pca_coords)
    axes = (f"PC1 ({100 * ratios[0]:.1f} %)", f"PC2 ({100 * ratios[1]:.1f} %)")
    plot_latent_scatter(results.pca_coords, labels, f"PCA of test z_mean (n={n}), labels 0-9", paths[0],
                        axis_names=axes, show=show, seed=order_seed)
    plot_latent_scatter(results.pca_coords, labels, f"Latent uzay PCA (test z_mean, n={n})", paths[1],
                        CLASS_NAMES_TR, axes, show, order_seed)


def draw_embeddings(results: Results, paths, show=False) -> None:
    """UMAP and t-SNE of the seeded subset; UMAP is absent when umap-learn could not be had (a warning says so)."""
    subset, labels = results.embeddings["subset"], results.y_test
    for method, path in (("t-SNE", paths[1]), ("UMAP", paths[0])):
        if method in results.embeddings:
            plot_latent_scatter(results.embeddings[method], labels[subset],
                                f"Latent uzay {method} (test z_mean, seeded subset n={len(subset)})", path,
                                CLASS_NAMES_TR, (f"{method} 1", f"{method} 2"), show,
                                seed_for(results.config, "scatter_order"))


def draw_generated_samples(results: Results, paths, show=False) -> None:
    plot_images(results.generated_grid, f"Generated: decoder(z),\nz ~ {generator_label(results.config)}", paths[0],
                show=show)


def draw_trained_prior_samples(results: Results, paths, show=False) -> None:
    plot_images(results.trained_prior_grid, f"Samples of the prior the KL trained against: decoder(z),\n"
                f"z ~ {prior_label(results.config)}", paths[0], show=show)


def draw_class_conditional(results: Results, paths, show=False) -> None:
    rows = [f"{CLASS_NAMES_TR[c]}\n({CLASS_NAMES_EN[c]})" for c in results.conditional_classes]
    plot_images(results.conditional_grid, "Class-conditional samples: decoder(z), z ~ a Gaussian mixture fitted to "
                "each class's training z_mean", paths[0], rows,
                [str(k + 1) for k in range(results.conditional_grid.shape[1])], show)


def draw_interpolation(results: Results, paths, show=False) -> None:
    steps = results.interpolation.shape[1]
    plot_images(results.interpolation, "Latent interpolation: decoder((1-t) z_a + t z_b), z = z_mean of noisy test "
                "images", paths[0], results.interpolation_labels, [f"t={s / (steps - 1):.2f}" for s in range(steps)],
                show)


def draw_traversal(results: Results, paths, show=False) -> None:
    steps, span = results.traversal.shape[1], TRAVERSAL_SPAN
    plot_images(results.traversal, "Latent traversal: decoder(mean + t·sd·PC_k) along the top principal directions "
                "of z_mean", paths[0],
                [f"PC{r + 1}\n({100 * ratio:.0f} %)" for r, ratio in enumerate(results.traversal_ratios)],
                [f"{-span + 2 * span * c / (steps - 1):+.1f} sd" for c in range(steps)], show)


@dataclasses.dataclass(frozen=True)
class Output:
    files: tuple  # names in the output folder
    shows: str
    draw: Callable | None = None  # the drawing function render() calls as draw(results, paths, show)
    written_by: str | None = None  # the writer of a file that is not drawn


# Every file a run writes, in the order the notebook shows the figures. render() draws the figures from here;
# README's outputs table is made from it (tools/sync_docs.py), and the tests read it.
OUTPUTS = [
    Output(("01_train_total_loss.png", "02_train_recon_loss.png", "03_train_kl_loss.png", "03B_train_supcon_loss.png",
            "04_beta_warmup.png"), "training curves per epoch: total loss, BCE, KL, SupCon, beta",
           draw_training_curves),
    Output(("05_denoising_grid.png",), "clean / noisy / denoised test images, one column per class",
           draw_denoising_grid),
    Output(("10_per_class_denoising.png",), "mean PSNR per class of the noisy input and the VAE", draw_per_class_psnr),
    Output(("06A_latent_pca_numbers.png", "06B_latent_pca_text_tr.png"),
           "PCA of every test `z_mean`, labelled 0-9 and with Turkish class names", draw_pca),
    Output(("06C_latent_umap_text_tr.png", "06D_latent_tsne_text_tr.png"),
           "UMAP and t-SNE of a seeded test subset (no UMAP where umap-learn cannot be had; neither with "
           "`embed_samples` 0)", draw_embeddings),
    Output(("07_generated_prior.png",), "10x10 samples `decoder(z)`, `z` from the generator: a Gaussian mixture "
           "fitted to the training `z_mean` after training (`generator` expost), or the prior", draw_generated_samples),
    Output(("07B_generated_trained_prior.png",), "10x10 samples of the prior the KL trained against (N(0, I) or "
           "the learned mixture)", draw_trained_prior_samples),
    Output(("12_class_conditional.png",), "one row per class: samples of a Gaussian mixture fitted to that class's "
           "training `z_mean` (`conditional_components`)", draw_class_conditional),
    Output(("08_latent_interpolation.png",), "8 straight lines between the `z_mean` of test images of two classes",
           draw_interpolation),
    Output(("11_latent_traversal.png",), "steps along the top 5 principal directions of `z_mean`", draw_traversal),
    Output(("09_generation_quality.png",), "Fréchet distances of reconstructions and of each kind of sample; their "
           "classes (not with `gen_metrics` 0)", draw_generation_quality),
    Output(("13_noise_robustness.png",), "PSNR / SSIM of the noisy input, TV and the VAE for sigma 0.1-0.8",
           draw_noise_robustness),
    Output(tuple(name for name, _title, _subtitle in TITLE_PANELS), "framed 16:9 title cards of the four parts",
           draw_title_cards),
    Output(("history.csv", "noise_robustness.csv", "pca_explained_variance.txt"),
           "losses per epoch; the noise-robustness table; PCA variance per component", written_by="write_reports"),
    Output(("metrics.csv", "metrics.txt"), "every figure with its unit, image count and definition; the readable "
           "report (written after every other result: their presence means the run's figures, models and tables "
           "are all there)", written_by="write_reports"),
    Output(("encoder.keras", "decoder.keras", "prior.npz"), "the trained models (plain Keras layers: image -> "
           "`z_mean, z_log_var`; `z` -> image); the generator's mixture (weights, means, covariances) and the "
           "trained prior's (`trained_*`; none when both are N(0, I))",
           written_by="save_models"),
    Output(("config.json", "run_status.json", "timings.csv"), "the settings, variables, precision, CPU and versions "
           "that ran; `running` / `finished` / `failed`; seconds per stage", written_by="run"),
    Output(("checkpoint/",), "the training state, for resuming an interrupted run", written_by="Checkpoint"),
]


def output_files() -> list[str]:
    """The name of every file of OUTPUTS, without the checkpoint folder."""
    return [name for output in OUTPUTS for name in output.files if not name.endswith("/")]


def render(results: Results, out: Path, show: bool = False) -> None:
    """Draw every figure of OUTPUTS from Results."""
    for output in OUTPUTS:
        if output.draw is not None:
            output.draw(results, [out / name for name in output.files], show)


# =============================================================================
# 7. Reports: one table of metric definitions, metrics.csv / metrics.txt, models, config
# =============================================================================

# The image sets scored with image_quality(): method -> (group of its metrics, which images it counts, what
# they are)
QUALITY_ROWS = {
    "noisy": ("denoising", "test", "the noisy input"),
    "vae": ("denoising", "test", "the VAE output decoder(z_mean(noisy))"),
    "clean_input": ("reference", "test", "decoder(z_mean(clean test image)): the same model given clean inputs, a "
                    "reference (no bound: the encoder was trained on noisy inputs)"),
    "tv_chambolle": ("classical", "classical", CLASSICAL_DENOISERS["tv_chambolle"]),
    "nl_means": ("classical", "classical", CLASSICAL_DENOISERS["nl_means"]),
    "vae_subset": ("classical", "classical", "the VAE output decoder(z_mean)"),
    "noisy_subset": ("classical", "classical", "the noisy input"),
}
QUALITY_DEFINITIONS = {
    "mse": "mean over the images of the per-image MSE against the clean image",
    "psnr": "mean over the images of skimage peak_signal_noise_ratio(clean, image, data_range=1)",
    "ssim": "mean over the images of skimage structural_similarity(clean, image, data_range=1)",
    "psnr_pooled": "10*log10(1 / MSE) with the MSE pooled over every pixel of every image (one PSNR of the whole "
                   "set)",
}
COUNTED = {"test": "the test images", "classical": "the seeded classical-reference test subset"}


def quality_rows(methods) -> dict:
    """The METRICS rows of image_quality() means for the given QUALITY_ROWS."""
    rows = {}
    for method in methods:
        group, counted, what = QUALITY_ROWS[method]
        for metric, definition in QUALITY_DEFINITIONS.items():
            unit = "dB" if metric.startswith("psnr") else ""
            rows[f"{method}_{metric}"] = (group, unit, counted, f"{definition}, of {what}, on {COUNTED[counted]}")
    return rows


# name -> (group, unit, which images it counts, definition); the order is the order of metrics.csv.
METRICS = {
    **quality_rows(("noisy", "vae")),
    "mse_improvement_pct": ("gain", "%", "test", "100 * (1 - vae_mse / noisy_mse)"),
    "psnr_gain_db": ("gain", "dB", "test", "vae_psnr - noisy_psnr"),
    "ssim_gain": ("gain", "", "test", "vae_ssim - noisy_ssim"),
    **quality_rows(("clean_input",)),
    "linear_probe_accuracy": (
        "representation", "", "test",
        "test accuracy of StandardScaler+LogisticRegression fitted on z_mean of the noisy training images",
    ),
    "knn10_accuracy": ("representation", "", "test",
        "test accuracy of a 10-nearest-neighbour classifier on the same z_mean split"),
    "silhouette": ("representation", "", "silhouette",
        "sklearn silhouette_score of test z_mean against the class labels (seeded subset)"),
    **quality_rows(("tv_chambolle", "nl_means", "vae_subset", "noisy_subset")),
    "classifier_test_accuracy": ("generation", "", "generation",
        "test accuracy of the small CNN (3 epochs on clean training images) whose 64-d penultimate features "
        "define the Fréchet distances"),
    "fd_clean_train": ("generation", "", "generation",
        "Fréchet distance between classifier features of clean training images and of clean test images (a "
        "real-image reference: what a perfect generator scores, up to sampling error)"),
    "fd_vae_reconstruction": ("generation", "", "generation",
        "Fréchet distance of VAE outputs decoder(z_mean(noisy test)) to clean test images"),
    "fd_prior_samples": ("generation", "", "generation",
        "Fréchet distance of the generator's samples decoder(z) to clean test images; z ~ the generator: with "
        "generator=expost a Gaussian mixture of expost_components full-covariance components fitted by EM to the "
        "training z_mean (EXPOST_FIT_SAMPLES of them, seeded) after training (what 07_generated_prior.png and "
        "prior.npz hold), with generator=prior the prior the KL trained against"),
    "fd_noisy_input": ("generation", "", "generation",
        "Fréchet distance of the noisy test images to clean test images (a worst-case reference)"),
    "prior_class_entropy": ("generation", "", "generation",
        "entropy of the classifier's labels for the generator's samples / log(10); 1 = every class equally often"),
    "prior_mean_confidence": ("generation", "", "generation",
        "mean max-softmax probability of the classifier on the generator's samples"),
    "fd_trained_prior_samples": ("generation", "", "generation",
        "Fréchet distance of decoder(z), z ~ the prior the KL trained against (N(0, I), or the learned mixture "
        "with prior=mixture), to clean test images"),
    "trained_prior_class_entropy": ("generation", "", "generation",
        "as prior_class_entropy, for the trained prior's samples"),
    "trained_prior_mean_confidence": ("generation", "", "generation",
        "as prior_mean_confidence, for the trained prior's samples"),
    "fd_training_codes": ("generation", "", "generation",
        "Fréchet distance of decoder(z_mean) of seeded noisy training images (as many as the samples) to clean "
        "test images: the limit of any density of the training z_mean"),
    "fd_conditional_samples": ("generation", "", "generation",
        "Fréchet distance of class-conditional samples (decoder(z), z ~ a Gaussian mixture of conditional_components"
        " fitted to CONDITIONAL_FIT_SAMPLES seeded training z_mean of one class; as many of each class as the test "
        "images hold) to clean test images"),
    "conditional_agreement": ("generation", "", "generation",
        "share of the class-conditional samples that the classifier labels as the class they were drawn for"),
    "reconstruction_agreement": ("generation", "", "generation",
        "share of the VAE reconstructions of noisy test images that the classifier labels as their true class "
        "(the reference for conditional_agreement: decoded images are blurrier than real ones)"),
    **{
        f"{kind}_{c}": ("generation", "", f"class {c}", f"{text} {c} ({CLASS_NAMES_EN[c]} / {CLASS_NAMES_TR[c]})")
        for c in range(NUM_CLASSES)
        for kind, text in (
            ("conditional_agreement", "as conditional_agreement, for the samples of class"),
            ("fd_conditional", "Fréchet distance of the conditional samples to the clean test images of class"),
            ("fd_reconstruction", "Fréchet distance of the VAE reconstructions of the noisy test images to the clean "
             "test images (the same images, as many as the conditional samples) of class"),
        )
    },
}


def metrics_table(summary: dict, representation: dict, n_test: int, classical: dict,
                  generation: dict | None) -> pd.DataFrame:
    """One row per metric of METRICS whose stage ran: value, unit, images counted, definition."""
    values = {**summary, **representation, **classical, **(generation or {})}
    counts = {"test": n_test, "silhouette": representation["silhouette_samples"],
              "classical": classical["classical_samples"]}
    if generation:
        counts |= {"generation": generation["fd_samples"], **{f"class {c}": k for c, k in enumerate(
            generation["class_images"])}}
    rows = [
        {"group": group, "name": name, "value": values[name], "unit": unit, "n_images": counts[count],
         "definition": definition}
        for name, (group, unit, count, definition) in METRICS.items() if count in counts
    ]
    return pd.DataFrame(rows)


def metrics_report(results: Results) -> str:
    """metrics.txt: the data and the settings, metrics.csv's figures by group (metrics.csv defines them), the
    noise-robustness table and the warnings."""
    config, table = results.config, results.metrics
    lines = [f"VAE on Fashion-MNIST: {results.n_train} training and {len(results.y_test)} test images from "
             f"{results.source}",
             f"noise: x_noisy = clip(x + {config.noise_factor} * N(0,1), 0, 1); settings: config.json; the "
             f"definitions of the figures: metrics.csv"]
    for group, rows in table.groupby("group", sort=False):
        lines += ["", group, rows[["name", "value", "unit", "n_images"]].to_string(index=False)]
    lines += ["", "noise robustness (noise_robustness.csv; the VAE was trained at sigma "
              f"{config.noise_factor})", results.robustness.to_string(index=False), *robustness_summary(
                  results.robustness)]
    lines += ["", "warnings", *([f"- {w}" for w in results.warnings] or ["- none"])]
    return "\n".join(lines) + "\n"


def pca_report(ratios: np.ndarray) -> str:
    lines = ["PCA of test-set z_mean: explained variance ratio per component", "component  ratio     cumulative"]
    for i, (ratio, cumulative) in enumerate(zip(ratios, np.cumsum(ratios)), start=1):
        lines.append(f"PC{i:<8d} {ratio:.5f}   {cumulative:.5f}")
    lines.append(f"The 2-D PCA plots (06A, 06B) show {100 * ratios[:2].sum():.1f} % of the variance.")
    return "\n".join(lines) + "\n"


def write_reports(results: Results, out: Path) -> None:
    """The tables and text reports; metrics.csv and metrics.txt last, both from text made before either is
    written, so that their presence means every figure, model and table of the run is there."""
    write_csv(out / "history.csv", results.history)
    write_csv(out / "noise_robustness.csv", results.robustness)
    write_text(out / "pca_explained_variance.txt", pca_report(results.pca_ratios))
    report = metrics_report(results)
    write_csv(out / "metrics.csv", results.metrics)
    write_text(out / "metrics.txt", report)


def save_models(vae: VAE, out: Path) -> None:
    """encoder.keras (image -> z_mean, z_log_var) and decoder.keras (z -> image), in built-in Keras layers only
    (keras.models.load_model opens them without this module), and prior.npz: the generator's weights, means and
    full covariances (README: the notebook's last cell) and, with prior=mixture, the trained prior's as
    trained_weights, trained_means, trained_variances; none when both are N(0, I)."""
    for model, name in ((vae.encoder, "encoder.keras"), (vae.decoder, "decoder.keras")):
        with atomic_path(out / name) as tmp:
            model.save(tmp)
    generator, trained = vae.generator, {}
    if vae.prior is not None:
        trained = vae.prior.parameters()
        if generator is None:  # the trained prior is the generator
            generator = {"weights": trained["weights"], "means": trained["means"],
                         "covariances": full_covariances(trained)}
    if generator is not None:
        with atomic_path(out / "prior.npz") as tmp:
            np.savez(tmp, **generator, **{f"trained_{name}": value for name, value in trained.items()})


def effective_config_record(config: Config, precision: str | None = None, overrides: dict | None = None,
                            environ=None) -> dict:
    """config.json: the settings that ran, where they came from (environ: the variables config_from_env read,
    os.environ unless given), and the versions."""
    environ = os.environ if environ is None else environ
    return {
        "config": dataclasses.asdict(config),
        "overrides": dict(OVERRIDES if overrides is None else overrides),
        "environment_variables": {rule["env"]: environ.get(rule["env"]) for rule in SETTINGS.values()},
        "dtype_policy": precision or resolve_precision(config),  # what precision="auto" resolved to
        "cpu": cpu_model_name(),
        "versions": {"python": platform.python_version(), **{m.__name__: m.__version__ for m in (tf, keras, np, pd)}},
    }


# =============================================================================
# 8. run(): load -> noise -> build -> train -> analyse -> save models -> render -> report
# =============================================================================


def run(config: Config, show_plots: bool = False, environ=None, **search) -> pd.DataFrame:
    """Run the whole pipeline into config.out_dir; returns the metrics table. environ: the variables config
    was made from (config_from_env's; os.environ unless given), as config.json records them."""
    out = prepare_output_dir(config.out_dir)
    started_at = now()
    write_run_status(out, "running", started_at)
    timer = StageTimer()
    try:
        strategy = setup_devices(config)
        precision = keras.mixed_precision.global_policy().name  # what setup_devices resolved "auto" to
        record = effective_config_record(config, precision, environ=environ)
        write_text(out / "config.json", json.dumps(record, indent=2) + "\n")
        print(f"  {device_summary(strategy)}")
        checkpoint = open_checkpoint(out, config, strategy.num_replicas_in_sync, precision)
        with timer.stage("load"):
            data = load_fashion_mnist(config, **search)
            print(f"  {data.source}: train {data.x_train.shape}, test {data.x_test.shape}")
        with timer.stage("noise"):
            data = with_noise(data, config)
        with timer.stage("build"):
            vae = build_distributed_vae(config, strategy)
        with timer.stage("train"):
            history = train_vae(vae, data.x_train_noisy, data.x_train, data.y_train, config, checkpoint,
                                progress_verbosity())
        results = analyse(vae, data, history, config, timer.stage)
        with timer.stage("save models"):
            save_models(vae, out)
        with timer.stage("plots"):
            render(results, out, show_plots)
        with timer.stage("report"):
            write_reports(results, out)
    except BaseException as error:
        write_run_status(out, "failed", started_at, error=f"{type(error).__name__}: {error}")
        raise
    timings = timer.frame()
    write_csv(out / "timings.csv", timings)
    write_run_status(out, "finished", started_at, data_source=data.source, warnings=results.warnings)
    print("\n" + (out / "metrics.txt").read_text(encoding="utf-8"))
    print("Stage timings (s):\n" + timings.to_string(index=False))
    print("\n" + list_output_dir(out))
    return results.metrics


def main(environ=None, show_plots: bool = False) -> pd.DataFrame:
    return run(config_from_env(environ), show_plots=show_plots, environ=environ)


def cli() -> int:
    """Script entry point: a readable message and a non-zero exit on bad input."""
    try:
        main()
    except VAEFashionError as error:
        print(f"\nERROR: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    return 0


# =============================================================================
# 9. Appendix: the plumbing
# =============================================================================

# --- Errors: one class per thing a user must fix (ConfigError is in section 1) ---------


class DatasetError(VAEFashionError, ValueError):
    """The dataset is missing, incomplete or malformed."""


class OutputDirError(VAEFashionError):
    """The output folder cannot be created or written."""


class TrainingDivergedError(VAEFashionError):
    """A loss term became NaN or infinite during training."""


class CheckpointMismatchError(VAEFashionError):
    """The output folder holds a checkpoint made with different settings."""


# --- Settings: OVERRIDES and VAE_* environment variables, one validation path ------------

KAGGLE_WORKING = Path("/kaggle/working")


def default_out_dir() -> Path:
    return KAGGLE_WORKING / OUT_FOLDER if KAGGLE_WORKING.is_dir() else Path(OUT_FOLDER)


def shown_default(rule: dict):
    """A setting's default as the tables show it: unset, 0/1 for on/off settings, else the value."""
    if rule["default"] is None:
        return "unset"
    return int(rule["default"]) if rule["kind"] is bool else rule["default"]


def parse_setting(field: str, raw: str, source: str, hint: str):
    """One setting's text, parsed and checked by its declaration; `source` names it in errors (VAE_EPOCHS,
    OVERRIDES['epochs'] or PRESETS['faithful']['epochs'])."""
    kind, text = SETTINGS[field]["kind"], raw.strip()
    if kind is str:
        return text or None  # unset: the default (out_dir: default_out_dir())
    value = {"0": False, "1": True}.get(text, text) if kind is bool else text
    if kind in (int, float):
        with contextlib.suppress(ValueError):
            value = kind(text)
    problem = setting_problem(field, value)
    if problem:
        raise ConfigError(f"{source}={raw!r} {problem}; {hint} to use the default ({shown_default(SETTINGS[field])})")
    return value


def parse_value(field: str, value, source: str, hint: str):
    """A Python value (OVERRIDES, PRESETS) through the same parser as an environment variable's text."""
    return parse_setting(field, str(int(value)) if isinstance(value, bool) else str(value), source, hint)


def refuse_unknown(names, known, where: str, aliases: dict | None = None) -> None:
    """An unknown setting stops the run before any work, naming the setting it probably meant: a close
    spelling, or the setting that `aliases` maps the name to (a VAE_* name written in OVERRIDES)."""
    unknown = sorted(set(names) - set(known))
    if not unknown:
        return
    guesses = []
    for name in unknown:
        meant = (aliases or {}).get(name) or next(iter(difflib.get_close_matches(name, known, 1, 0.75)), None)
        guesses.append(f"{name} (did you mean {meant}?)" if meant else name)
    raise ConfigError(f"{where} names unknown setting(s) {', '.join(guesses)}; the settings are: {', '.join(known)}")


def config_from_env(environ=None, overrides: dict | None = None) -> Config:
    """The effective Config: the defaults, then the preset's values, then OVERRIDES, then VAE_* environment
    variables. Unset or empty variables (and None in OVERRIDES) keep the default. Anything that does not
    parse, is out of range, or is not a setting at all (VAE_EPOCH) raises ConfigError naming where it came
    from."""
    environ = os.environ if environ is None else environ
    overrides = OVERRIDES if overrides is None else overrides
    variables = {rule["env"]: field for field, rule in SETTINGS.items()}
    refuse_unknown([name for name in environ if name.startswith("VAE_")], list(variables), "the environment")
    refuse_unknown(overrides, list(SETTINGS), "OVERRIDES", variables)
    values = {}
    for name, field in variables.items():
        if environ.get(name, "").strip():
            values[field] = parse_setting(field, environ[name], name, f"unset {name}")
        elif overrides.get(field) is not None:
            values[field] = parse_value(field, overrides[field], f"OVERRIDES[{field!r}]",
                                        f"remove {field!r} from OVERRIDES")
    preset = values.get("preset", "default")
    refuse_unknown(PRESETS[preset], list(SETTINGS), f"PRESETS[{preset!r}]")
    for field, value in PRESETS[preset].items():  # Config applies them; checked here to name PRESETS in an error
        parse_value(field, value, f"PRESETS[{preset!r}][{field!r}]", "fix PRESETS")
    config = Config(**{**values, "out_dir": values.get("out_dir") or str(default_out_dir())})
    if config.generator == "expost" and config.expost_components > (config.train_samples or 60_000):
        raise ConfigError(f"VAE_EXPOST_COMPONENTS={config.expost_components} is more than the {config.train_samples} "
                          "training images it is fitted to (VAE_TRAIN_SAMPLES); lower it, or set VAE_GENERATOR=prior")
    return config


# --- Several devices and precisions: MirroredStrategy, mixed precision, what this machine is ----------


def setup_devices(config: Config) -> tf.distribute.Strategy:
    """Sets the Keras dtype policy and returns the strategy to build and train in. Call before building.

    "one": the default strategy (TensorFlow places the work on the first GPU, else the CPU). "all":
    MirroredStrategy over every GPU, or, with no GPU, over the logical CPU devices the CPU was split
    into (how the tests exercise it); with a single device it is the default strategy again."""
    keras.mixed_precision.set_global_policy(resolve_precision(config))
    # TensorFlow's own choice (0) trained 1.5x slower in 2 processes of 3 on an Intel Xeon with AMX, the count set
    # explicitly never (docs/RESULTS.md). Settable only before TensorFlow's first operation.
    with contextlib.suppress(RuntimeError):
        tf.config.threading.set_intra_op_parallelism_threads(os.cpu_count() or 0)
    if config.devices == "all":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        if len(devices) > 1:
            return tf.distribute.MirroredStrategy([device.name for device in devices])
    return tf.distribute.get_strategy()


def resolve_precision(config: Config, compute_capability=None, cpuinfo: str | None = None) -> str:
    """The Keras dtype policy that VAE_PRECISION names; "auto" picks it for this machine. GPUs: bfloat16
    from compute capability 8.0, float16 on 7.x (Tensor Cores: V100, T4), float32 below (no math speed from
    float16, says TensorFlow's mixed-precision guide)."""
    if config.precision != "auto":
        return config.precision
    capability = gpu_compute_capability() if compute_capability is None else compute_capability
    if capability:
        major = capability[0]
        return "mixed_bfloat16" if major >= 8 else "mixed_float16" if major >= 7 else "float32"
    return "mixed_bfloat16" if cpu_prefers_bfloat16(cpuinfo) else "float32"


def cpu_prefers_bfloat16(cpuinfo: str | None = None) -> bool:
    """Whether bfloat16 layers train faster than float32 on this CPU, as measured: with AMX, or on an AMD CPU
    with AVX512_BF16 (1.25-1.6x faster per step); an Intel CPU with AVX512_BF16 but no AMX was 1.6x slower."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return "amx_bf16" in flags or ("avx512_bf16" in flags and "AuthenticAMD" in flags)


def gpu_compute_capability() -> tuple[int, int] | None:
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    return tuple(tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0)))


def device_summary(strategy: tf.distribute.Strategy) -> str:
    """One line: where the run trains, in how many replicas, in which precision, on which CPU; and a note on
    a TPU runtime (Kaggle, Colab), where the notebook has no TPUStrategy and trains on the host CPU."""
    gpus = tf.config.list_logical_devices("GPU")
    devices = (strategy.extended.worker_devices if strategy.num_replicas_in_sync > 1
               else [gpus[0].name if gpus else "CPU:0"])
    line = (f"devices: {', '.join(name.split('device:')[-1] for name in devices)}; "
            f"{strategy.num_replicas_in_sync} replica(s); precision {keras.mixed_precision.global_policy().name}; "
            f"CPU {cpu_model_name()}")
    tpu = next((f"{name}={os.environ[name]}" for name in ("TPU_ACCELERATOR_TYPE", "TPU_NAME", "COLAB_TPU_ADDR")
                if os.environ.get(name)), "/dev/accel0" if Path("/dev/accel0").exists() else None)
    if tpu:
        line += (f"\n  NOTE: this is a TPU runtime ({tpu}), but the notebook has no TPUStrategy: it trains on the "
                 "host CPU, far slower than a GPU (not measured on a TPU VM). A GPU runtime (T4) is the fast choice.")
    return line


def cpu_model_name() -> str:
    """The CPU's name and model number, recorded with every run: timings depend on it."""
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    return f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


# --- The VAE as run() trains it: several devices, float16, exact resume, fresh noise ----------------------


def replica_context():
    """MirroredStrategy's replica context while several replicas train in sync, else None."""
    context = tf.distribute.get_replica_context()
    return context if context is not None and context.num_replicas_in_sync > 1 else None


def batches_per_epoch(n_train: int, config: Config, replicas: int = 1) -> int:
    """Every image on one device; on several, only full batches, so that every replica gets the same number of
    images (the last partial batch of each epoch's order is dropped)."""
    if replicas == 1:
        return math.ceil(n_train / config.batch_size)
    if config.batch_size % replicas:
        raise ConfigError(f"VAE_BATCH_SIZE={config.batch_size} does not split evenly over {replicas} replicas "
                          f"(VAE_DEVICES=all); use a multiple of {replicas}, or VAE_DEVICES=one")
    if n_train < config.batch_size:
        raise ConfigError(f"VAE_TRAIN_SAMPLES={n_train} is less than one batch (VAE_BATCH_SIZE={config.batch_size}), "
                          "and VAE_DEVICES=all trains on full batches only; use more images or a smaller batch")
    return n_train // config.batch_size


def keyed_normal(shape, dtype, seed: int, step_key):
    """Standard normal noise of this replica's `shape` (rows, columns), a function of (seed, step_key) alone.
    It is drawn for the whole global batch and each replica takes its rows (global batches split evenly:
    make_train_dataset), so an image gets the same noise on one device or on several."""
    stream = tf.stack([tf.constant(seed, tf.int64), tf.cast(step_key, tf.int64)])
    stream = tf.random.experimental.stateless_fold_in(stream, 0)  # the stream one device always used
    context = replica_context()
    replicas, replica = (1, 0) if context is None else (context.num_replicas_in_sync,
                                                        context.replica_id_in_sync_group)
    rows, columns = shape
    epsilon = tf.random.stateless_normal(tf.stack([rows * replicas, columns]), seed=stream, dtype=dtype)
    return epsilon[replica * rows:(replica + 1) * rows]


@keras.saving.register_keras_serializable(package="vae_fashion")
class DistributedVAE(VAE):
    """The VAE as run() trains it, on one device or several (MirroredStrategy), from make_train_dataset's keyed
    batches: the objective of VAE's train_step, with a posterior sample keyed by (VAE_SEED, epoch, step) like the
    batches, so a resumed run repeats an uninterrupted one bit for bit; SupCon over the global batch; under
    mixed_float16 an overflow on any replica skips the step on all."""

    def train_step(self, batch):
        rows, step_key = tf.shape(batch["noisy"])[0], batch["step_key"][0]
        epsilon = keyed_normal((rows, self.config.latent_dim), self.sampling.compute_dtype,
                               seed_for(self.config, "posterior"), step_key)
        with tf.GradientTape() as tape:
            losses = self.compute_losses(batch["noisy"], batch["clean"], batch["label"], epsilon, training=True)
            # replica gradients are summed: each replica contributes its batch mean / replicas
            share = losses["total_loss"] / tf.distribute.get_strategy().num_replicas_in_sync
            objective = self.optimizer.scale_loss(share)
        grads = tape.gradient(objective, self.trainable_weights)
        context = replica_context()
        if context is not None and isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            # The loss-scale optimizer decides "apply, or skip and halve the scale" from replica 0's gradients:
            # make every replica's gradients non-finite when any replica's are, so that all skip together.
            overflow = 1.0 - tf.cast(self.optimizer.check_finite(grads), tf.float32)
            overflows = context.all_reduce(tf.distribute.ReduceOp.SUM, overflow)
            grads = [ops.where(overflows > 0, ops.full_like(g, float("nan")), g) for g in grads]
        self.optimizer.apply(grads, self.trainable_weights)
        return self.track(losses)

    def supcon_term(self, z_mean, labels, recon):
        context = replica_context()
        if context is not None:  # every replica holds the global batch's term; the mean over replicas is the loss
            z_mean, labels = context.all_gather(z_mean, axis=0), context.all_gather(labels, axis=0)
            recon = context.all_reduce(tf.distribute.ReduceOp.MEAN, recon)
        return super().supcon_term(z_mean, labels, recon)


def build_distributed_vae(config: Config, strategy: tf.distribute.Strategy | None = None,
                          jit_compile="auto") -> DistributedVAE:
    """build_vae's DistributedVAE, built in the strategy's scope (every later load of its weights or its
    optimizer's state must also run there: see vae.distribute_strategy)."""
    with (strategy or tf.distribute.get_strategy()).scope():
        return build_vae(config, jit_compile, DistributedVAE)


STEP_KEY_STRIDE = 1_000_003  # more than the steps of any epoch: one key per (epoch, step)


def make_train_dataset(noisy, clean, labels, config: Config, first_epoch: int, epochs: int | None = None,
                       replicas: int = 1) -> tf.data.Dataset:
    """Batches for epochs first_epoch..epochs-1, gathered by index from tensors that stay in memory. Each
    epoch's order, and with fresh_noise its noise, depend only on (seed, epoch, batch), so a resumed run sees
    the same batches as an uninterrupted one; without fresh_noise the fixed noisy copy is used. Each batch
    carries its step key, which also keys the posterior sample. Several replicas get full batches only."""
    epochs = config.epochs if epochs is None else epochs
    clean_t = tf.constant(clean)
    noisy_t = None if config.fresh_noise else tf.constant(noisy)
    labels_t = tf.constant(labels, dtype=tf.int32)
    n, seed = len(clean), tf.constant(config.seed, tf.int64)

    def epoch_batches(epoch):
        keys = tf.random.stateless_uniform([n], seed=tf.stack([seed, epoch]))
        order = tf.data.Dataset.from_tensor_slices(tf.argsort(keys)).batch(config.batch_size, replicas > 1)
        return order.enumerate().map(lambda step, index: (epoch * STEP_KEY_STRIDE + step, index))

    def gather(step_key, index):
        x = tf.gather(clean_t, index)
        if noisy_t is None:
            noise_seed = tf.stack([tf.constant(seed_for(config, "train_noise"), tf.int64), step_key])
            noise = tf.random.stateless_normal(tf.shape(x), seed=noise_seed)
            noisy_batch = tf.clip_by_value(x + config.noise_factor * noise, 0.0, 1.0)
        else:
            noisy_batch = tf.gather(noisy_t, index)
        # one key per example, so that MirroredStrategy can split it with the batch
        step_keys = tf.fill(tf.shape(index), step_key)
        return {"noisy": noisy_batch, "clean": x, "label": tf.gather(labels_t, index), "step_key": step_keys}

    batches = tf.data.Dataset.range(first_epoch, epochs).flat_map(epoch_batches)
    return batches.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def train_vae(vae: DistributedVAE, x_noisy, x_clean, labels, config: Config, checkpoint: Checkpoint | None = None,
              verbose="auto") -> pd.DataFrame:
    """Train as run() does (fresh noise, exact resume, several devices); returns one history row per epoch.

    With a checkpoint, training resumes after the last backed-up epoch (or the one before, when the newest
    copy is unreadable), and a finished training is loaded instead of repeated. Raises TrainingDivergedError
    when a loss term becomes NaN or infinite."""
    if checkpoint is not None and checkpoint.weights.is_file():
        with vae.distribute_strategy.scope():  # MirroredStrategy loads variables only in its scope
            vae.load_weights(checkpoint.weights)  # the optimizer's state too
        print(f"  training already finished: loaded {checkpoint.weights} (set VAE_FRESH=1 to retrain)")
        return pd.DataFrame(checkpoint.history(), columns=HISTORY_COLUMNS)
    rows = checkpoint.restore(vae) if checkpoint is not None else []
    first_epoch = len(rows)
    if first_epoch:
        print(f"  resuming after epoch {first_epoch} from {checkpoint.epoch_weights(first_epoch)}")
    guard = StopOnNonFinite()
    history = EpochHistoryLog(checkpoint, rows, guard)
    replicas = vae.distribute_strategy.num_replicas_in_sync
    if first_epoch < config.epochs:
        vae.fit(
            make_train_dataset(x_noisy, x_clean, labels, config, first_epoch, replicas=replicas),
            epochs=config.epochs,
            initial_epoch=first_epoch,
            steps_per_epoch=batches_per_epoch(len(x_clean), config, replicas),
            callbacks=[FitPrior(x_noisy, config), guard, history, TrainingTimeEstimate(config.epochs)],
            verbose=verbose,
            shuffle=False,  # the dataset shuffles by (seed, epoch) itself
        )
    if guard.failure is not None:
        raise TrainingDivergedError(diverged_message(*guard.failure))
    if checkpoint is not None:
        with atomic_path(checkpoint.weights) as tmp:
            vae.save_weights(tmp)
    return history.frame()


def diverged_message(term: str, value: float, epoch: int, batch: int) -> str:
    return (f"training stopped: {term} became {value} in epoch {epoch}, batch {batch}. "
            "No epoch from it on was backed up. Lower VAE_LEARNING_RATE, VAE_GAMMA_SC or VAE_BETA_MAX (with "
            "VAE_FRESH=1), or check the input data.")


class StopOnNonFinite(keras.callbacks.Callback):
    """keras.callbacks.TerminateOnNaN, remembering which loss term failed; an epoch that ends with a weight not
    finite (a last step whose loss was finite) fails too. EpochHistoryLog backs up no failed epoch."""

    def __init__(self):
        super().__init__()
        self.failure = None
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        for term in sorted(LOSS_TERMS, key=lambda name: name == "total_loss"):  # a term before the sum it breaks
            value = (logs or {}).get(term)
            if value is not None and not math.isfinite(float(value)):
                self.failure = (term, float(value), self.epoch + 1, batch)
                self.model.stop_training = True
                return

    def on_epoch_end(self, epoch, logs=None):
        if self.failure is None and not all(np.isfinite(w.numpy()).all() for w in self.model.weights):
            self.failure = ("a weight", float("nan"), epoch + 1, self.params.get("steps"))
            self.model.stop_training = True


class TrainingTimeEstimate(keras.callbacks.Callback):
    """After the first epoch of this fit, prints how long all the epochs will take on this machine, from the
    steps after the first (which includes building the graph)."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs, self.after_first_step, self.printed = epochs, None, False

    def on_train_batch_end(self, batch, logs=None):
        if self.after_first_step is None:
            self.after_first_step = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        steps = self.params.get("steps") or 0
        if self.printed or steps < 2:
            return
        self.printed = True
        per_step = (time.perf_counter() - self.after_first_step) / (steps - 1)

        def duration(seconds):
            return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"

        print(f"  {1000 * per_step:.0f} ms per step: the {self.epochs} epochs take about "
              f"{duration(per_step * steps * self.epochs)} on this machine, "
              f"{duration(per_step * steps * (self.epochs - epoch - 1))} from now ({cpu_model_name()})", flush=True)


# --- Data: IDX files (raw or .gz) or the Kaggle CSVs, searched in a fixed order -----------


def load_fashion_mnist(config: Config, **search) -> FashionMNIST:
    """Find, validate and preprocess Fashion-MNIST: the first N images of each split as float32 in [0, 1]."""
    (x_train, y_train, x_test, y_test), source = find_and_load_raw(config.data_dir, **search)
    x_train, y_train = (take_first(a, config.train_samples, "VAE_TRAIN_SAMPLES") for a in (x_train, y_train))
    x_test, y_test = (take_first(a, config.test_samples, "VAE_TEST_SAMPLES") for a in (x_test, y_test))
    return FashionMNIST(to_unit_float(x_train), y_train, to_unit_float(x_test), y_test, source)


def take_first(array: np.ndarray, count: int | None, variable: str) -> np.ndarray:
    if count is not None and count > len(array):
        raise ConfigError(f"{variable}={count} is larger than the {len(array)} images available; lower it")
    return array[:count]


IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
CSV_FILES = {"train": "fashion-mnist_train.csv", "test": "fashion-mnist_test.csv"}
KAGGLE_INPUT = Path("/kaggle/input")
DEBIAN_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
KERAS_CACHE_DIR = Path("~/.keras/datasets/fashion-mnist")
MAX_IDX_BYTES = 256 * 1024 * 1024  # a real Fashion-MNIST file is at most 47 MB; anything much larger is forged


def parse_idx(data: bytes, name: str = "<bytes>", expected_ndim: int | None = None) -> np.ndarray:
    """The bytes of an unsigned-byte IDX file as a uint8 array, after checking the magic number (0x0000 08 NN),
    the dimension count, and that the length is exactly header + product(dims); DatasetError otherwise."""
    if len(data) < 4:
        raise DatasetError(f"{name}: only {len(data)} bytes; an IDX file starts with a 4-byte magic number")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise DatasetError(f"{name}: bad magic number 0x{data[:4].hex()} (expected 0x000008NN, e.g. 0x00000803 for "
                           "images, 0x00000801 for labels); this is not an unsigned-byte IDX file")
    if expected_ndim is not None and ndim != expected_ndim:
        kind = {1: "labels (idx1)", 3: "images (idx3)"}.get(expected_ndim, f"idx{expected_ndim}")
        raise DatasetError(f"{name}: magic number 0x{data[:4].hex()} says {ndim} dimension(s), but {kind} were "
                           "expected; check that the file names were not swapped")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{name}: truncated header ({len(data)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if 0 in dims:  # no data, and numpy cannot even shape (0, 2**32, 2**32)
        raise DatasetError(f"{name}: the header (dims {dims}) describes an empty array; re-download or re-extract "
                           "the file")
    expected = header + math.prod(dims)
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "has trailing bytes"
        raise DatasetError(f"{name}: {problem}: {len(data)} bytes, but the header (dims {dims}) implies {expected}; "
                           "re-download or re-extract the file")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx(path, expected_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file, gzipped when its name ends in .gz, with a bounded read."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as handle:
            data = handle.read(MAX_IDX_BYTES + 1)
    except (OSError, EOFError, zlib.error) as error:
        raise DatasetError(f"{path}: cannot be read ({error}); re-download or re-extract the file") from None
    if len(data) > MAX_IDX_BYTES:
        raise DatasetError(f"{path}: larger than {MAX_IDX_BYTES} bytes; not a Fashion-MNIST IDX file")
    return parse_idx(data, str(path), expected_ndim)


def validated_split(images, labels, image_name, label_name) -> tuple[np.ndarray, np.ndarray]:
    """The one check every data source passes: 28x28 images with pixels in 0-255, as many labels as images,
    labels in 0-9. Returns uint8 images and int32 labels."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DatasetError(f"{image_name}: images are {images.shape[1:]} but Fashion-MNIST images are "
                           f"{IMAGE_SIZE}x{IMAGE_SIZE}; point VAE_DATA_DIR at the Fashion-MNIST files")
    if images.size and (images.min() < 0 or images.max() > 255):
        raise DatasetError(f"{image_name}: pixel values outside 0-255")
    if len(labels) != len(images):
        raise DatasetError(f"{label_name} holds {len(labels)} labels but {image_name} holds {len(images)} images; "
                           "the two files must come from the same split of the same dataset")
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        raise DatasetError(f"{label_name}: label {int(labels[bad[0]])} at index {int(bad[0])} is outside 0-9 "
                           f"({bad.size} such labels); this is not a Fashion-MNIST labels file")
    return images.astype(np.uint8), labels.astype(np.int32)


def idx_files_in(folder: Path) -> dict[str, Path | None]:
    """Each IDX file of `folder`, raw, .gz or in a folder of its own name (Kaggle's layout), or None."""
    return {key: next((path for path in (folder / stem, folder / f"{stem}.gz", folder / stem / stem)
                       if path.is_file()), None) for key, stem in IDX_FILES.items()}


def load_idx_folder(folder) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four IDX files of one folder as validated uint8 images and int32 labels."""
    folder = Path(folder)
    files = idx_files_in(folder)
    missing = [IDX_FILES[key] for key, path in files.items() if path is None]
    if missing:
        raise DatasetError(f"{folder}: missing {', '.join(missing)} (raw or .gz); all four Fashion-MNIST IDX files "
                           "must be in the same folder")
    arrays = []
    for split in ("train", "test"):
        image_path, label_path = files[f"{split}_images"], files[f"{split}_labels"]
        arrays += validated_split(read_idx(image_path, 3), read_idx(label_path, 1), image_path, label_path)
    return tuple(arrays)


def read_fashion_csv(path) -> tuple[np.ndarray, np.ndarray]:
    """Read a Kaggle Fashion-MNIST CSV (a header row, then label and 784 pixels per row), validated."""
    path = Path(path)
    try:
        values = pd.read_csv(path).to_numpy()
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise DatasetError(f"{path}: not a readable CSV ({error}); re-download the Kaggle dataset") from None
    if values.shape[1] != 1 + IMAGE_SIZE * IMAGE_SIZE or values.shape[0] == 0:
        raise DatasetError(f"{path}: has {values.shape[0]} rows x {values.shape[1]} columns; expected a label "
                           f"column plus {IMAGE_SIZE * IMAGE_SIZE} pixel columns")
    if not np.issubdtype(values.dtype, np.integer):
        raise DatasetError(f"{path}: holds non-integer or empty cells; expected integer labels and pixels")
    return validated_split(values[:, 1:].reshape(-1, IMAGE_SIZE, IMAGE_SIZE), values[:, 0], path,
                           f"{path} (first column)")


def holds_csvs(folder: Path) -> bool:
    return all((folder / name).is_file() for name in CSV_FILES.values())


def load_folder(folder: Path):
    """((x_train, y_train, x_test, y_test), source) of a folder with all four IDX files, or else both
    Kaggle CSVs; None when it has neither."""
    if all(idx_files_in(folder).values()):
        return load_idx_folder(folder), f"IDX files in {folder}"
    if holds_csvs(folder):
        (x_train, y_train), (x_test, y_test) = (read_fashion_csv(folder / CSV_FILES[s]) for s in ("train", "test"))
        return (x_train, y_train, x_test, y_test), f"Kaggle CSV files in {folder}"
    return None


def _kaggle_folders(root: Path, max_depth: int = 5):
    """Folders below /kaggle/input, in sorted order, that hold the IDX files or the Kaggle CSVs."""
    for current, dirs, _files in os.walk(root):
        if len(Path(current).relative_to(root).parts) >= max_depth:
            dirs[:] = []
        dirs.sort()
        folder = Path(current)
        if all(idx_files_in(folder).values()) or holds_csvs(folder):
            yield folder


def candidate_data_dirs() -> list[Path]:
    """Default search order after VAE_DATA_DIR (see README, 'Where the data comes from')."""
    first = KAGGLE_INPUT / "fashionmnist"
    return [first, *(f for f in _kaggle_folders(KAGGLE_INPUT) if f != first), DEBIAN_DATA_DIR,
            KERAS_CACHE_DIR.expanduser()]


def find_and_load_raw(data_dir=None, search_dirs=None, download=keras.datasets.fashion_mnist.load_data):
    """((x_train, y_train, x_test, y_test) as uint8/int32, where they came from). An explicit data_dir
    (VAE_DATA_DIR) must hold the data; otherwise the default folders are tried in order, then the Keras
    download."""
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise DatasetError(f"VAE_DATA_DIR={data_dir!r} is not a folder; point it at the folder holding the four "
                               "Fashion-MNIST IDX files, or unset it to search the default places")
        return load_folder(folder) or load_idx_folder(folder)  # load_idx_folder raises, naming the missing files
    searched = ["VAE_DATA_DIR (not set)"]
    for folder in map(Path, candidate_data_dirs() if search_dirs is None else search_dirs):
        loaded = load_folder(folder) if folder.is_dir() else None
        if loaded is not None:
            return loaded
        found = [p.name for p in idx_files_in(folder).values() if p] if folder.is_dir() else []
        searched.append(f"{folder}" + (f" (incomplete: only {', '.join(found)})" if found else ""))
    if download is not None:
        try:
            (x_train, y_train), (x_test, y_test) = download()
        except Exception as error:  # noqa: BLE001 - any failure means "offline"
            searched.append(f"keras.datasets.fashion_mnist.load_data() (failed: {type(error).__name__})")
        else:
            name = "keras.datasets.fashion_mnist"
            train = validated_split(x_train, y_train, f"{name} train images", f"{name} train labels")
            test = validated_split(x_test, y_test, f"{name} test images", f"{name} test labels")
            return (*train, *test), "keras download"
    listed = "\n".join(f"  - {place}" for place in searched)
    raise DatasetError(
        f"Fashion-MNIST was not found. Searched, in order:\n{listed}\nGet the data in one of three ways:\n"
        "  1. Kaggle: 'Add data' -> search 'fashionmnist' (zalando-research) and attach it;\n"
        f"  2. Debian/Ubuntu: apt-get install dataset-fashion-mnist (installs into {DEBIAN_DATA_DIR});\n"
        "  3. go online, so that keras.datasets.fashion_mnist.load_data() can download it.\n"
        "Or set VAE_DATA_DIR to a folder holding train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (raw or .gz).")


# --- Checkpoints: resume after a kill, reuse a finished training ---------------------------


def training_fingerprint(config: Config, replicas: int = 1, precision: str | None = None) -> dict:
    """The settings that shape the trained weights, the precision "auto" resolves to on this machine (unless
    given) and the replica count: a checkpoint is resumed only under the same ones."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if SETTINGS[k]["trains"]}
    return {**fields, "precision": precision or resolve_precision(config), "replicas": replicas}


@dataclasses.dataclass
class Checkpoint:
    """Training state kept in <out>/checkpoint so that a rerun resumes or reuses it. After epoch k it holds
    epoch-k.weights.h5 (model and optimizer), the copy of epoch k-1, and state.json, which names the last
    finished epoch and holds the history up to it. Each file is replaced atomically and state.json is written
    last, so the epoch, the weights and the history never disagree. (keras.callbacks.BackupAndRestore writes
    in place, and it also saves an epoch that stopped on a NaN.)"""

    root: Path

    @property
    def fingerprint(self) -> Path:
        return self.root / "fingerprint.json"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def weights(self) -> Path:  # present only when training finished
        return self.root / "vae.weights.h5"

    def epoch_weights(self, epoch: int) -> Path:
        return self.root / f"epoch-{epoch:04d}.weights.h5"

    def history(self) -> list[dict]:
        return json.loads(self.state.read_text())["history"] if self.state.is_file() else []

    def save_epoch(self, vae: keras.Model, rows: list[dict]) -> None:
        epoch = len(rows)
        with atomic_path(self.epoch_weights(epoch)) as tmp:
            vae.save_weights(tmp)
        write_text(self.state, json.dumps({"epochs_done": epoch, "history": rows}, indent=1) + "\n")
        for old in self.root.glob("epoch-*.weights.h5"):
            if old not in (self.epoch_weights(epoch), self.epoch_weights(epoch - 1)):
                old.unlink()

    def restore(self, vae: keras.Model) -> list[dict]:
        """Load the newest readable epoch backup into vae and return the history up to it; [] (and vae as it
        was) when there is none. Only the epochs before the first row with a loss not finite are resumed."""
        rows = list(itertools.takewhile(lambda row: all(map(math.isfinite, row.values())), self.history()))
        if not rows:
            return []
        with vae.distribute_strategy.scope():  # MirroredStrategy creates and loads variables only there
            variables = vae.variables + vae.optimizer.variables
            initial = [v.numpy() for v in variables]
            for epoch in (len(rows), len(rows) - 1):
                path = self.epoch_weights(epoch)
                if epoch < 1 or not path.is_file():
                    continue
                try:
                    vae.load_weights(path)
                    return rows[:epoch]
                except Exception as error:  # noqa: BLE001 - any unreadable backup: try the older copy
                    print(f"  WARNING: cannot read the backup {path} ({type(error).__name__}: {error})")
            for variable, value in zip(variables, initial):
                variable.assign(value)
        print(f"  WARNING: no readable backup in {self.root}: training starts again from epoch 1")
        return []


class EpochHistoryLog(keras.callbacks.Callback):
    """Collects one history row per finished epoch and, with a checkpoint, backs up the training state after
    it (Checkpoint.save_epoch). An epoch the guard stopped is not finished: Keras calls on_epoch_end after a
    stop too."""

    def __init__(self, checkpoint: Checkpoint | None, rows: list[dict], guard: StopOnNonFinite):
        super().__init__()
        self.checkpoint, self.rows, self.guard = checkpoint, rows, guard

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.failure is not None:
            return
        logs = logs or {}
        self.rows.append({"epoch": epoch + 1, **{k: float(logs[k]) for k in HISTORY_COLUMNS[1:] if k in logs}})
        if self.checkpoint is not None:
            self.checkpoint.save_epoch(self.model, self.rows)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=HISTORY_COLUMNS)


def open_checkpoint(out: Path, config: Config, replicas: int = 1, precision: str | None = None) -> Checkpoint:
    """<out>/checkpoint when it was made with the same settings, precision and replica count; refuses to mix
    them unless VAE_FRESH=1, which discards the old checkpoint."""
    checkpoint = Checkpoint(out / "checkpoint")
    wanted = training_fingerprint(config, replicas, precision)
    if checkpoint.root.exists():
        try:
            stored = json.loads(checkpoint.fingerprint.read_text())
        except (OSError, ValueError):
            stored = {}
        differences = {k: (stored.get(k), v) for k, v in wanted.items() if stored.get(k) != v}
        if differences and not config.fresh:
            listed = ", ".join(f"{k}: stored {a!r} vs now {b!r}" for k, (a, b) in differences.items())
            raise CheckpointMismatchError(
                f"{checkpoint.root} holds a training checkpoint made with other settings ({listed}). "
                "Rerun with the same settings to resume, set VAE_FRESH=1 to discard it and start fresh, "
                "or choose another VAE_OUT_DIR."
            )
        if differences or config.fresh:
            shutil.rmtree(checkpoint.root)
    checkpoint.root.mkdir(parents=True, exist_ok=True)
    write_text(checkpoint.fingerprint, json.dumps(wanted, indent=2) + "\n")
    return checkpoint


# --- Output folder, run status, stage timings -------------------------------------------

def prepare_output_dir(out_dir) -> Path:
    """Create the output folder, prove it is writable, and remove every output file of an earlier run
    (output_files()), so that none passes for this one's."""
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
        for name in output_files():  # the checkpoint stays: it is how a run resumes
            (out / name).unlink(missing_ok=True)
    except OSError as error:
        raise OutputDirError(
            f"output folder {out} is not writable ({error.strerror or error}); "
            "set VAE_OUT_DIR to a folder you can write to"
        ) from None
    return out


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_run_status(out: Path, status: str, started_at: str, **extra) -> None:
    record = {"status": status, "started_at": started_at, "updated_at": now(), "pid": os.getpid(),
              "host": platform.node(), **extra}
    write_text(out / "run_status.json", json.dumps(record, indent=2) + "\n")


class StageTimer:
    """Prints each stage with its wall time and keeps the rows for timings.csv."""

    def __init__(self):
        self.start = time.perf_counter()
        self.rows = []

    @contextlib.contextmanager
    def stage(self, name: str):
        print(f"[{name}] started at {time.perf_counter() - self.start:.1f} s", flush=True)
        began = time.perf_counter()
        yield
        seconds = time.perf_counter() - began
        self.rows.append({"stage": name, "seconds": round(seconds, 3)})
        print(f"[{name}] done in {seconds:.1f} s", flush=True)

    def frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows, columns=["stage", "seconds"])
        total = pd.DataFrame([{"stage": "total", "seconds": round(time.perf_counter() - self.start, 3)}])
        return pd.concat([frame, total], ignore_index=True)


def progress_verbosity(parent_command: str | None = None) -> int:
    """Keras' verbose for fit(): 1 (the live progress bar) in a terminal and an interactive notebook, 2 (one
    line per epoch) in logs and in a notebook executed headless (Kaggle's "Save & Run All", nbconvert,
    papermill), whose stored output would otherwise hold every bar update."""
    if sys.stdout.isatty():
        return 1
    if "ipykernel" not in sys.modules or os.environ.get("KAGGLE_KERNEL_RUN_TYPE") == "Batch":
        return 2
    if parent_command is None:  # the process that started this kernel
        with contextlib.suppress(OSError):
            parent_command = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    headless = any(word in (parent_command or "") for word in ("nbconvert", "nbclient", "papermill"))
    return 2 if headless else 1


def list_output_dir(out: Path) -> str:
    lines = [f"Contents of {out}:"]
    for path in sorted(out.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            lines.append(f"  {path.name:40s} {path.stat().st_size:>10,d} bytes")
    return "\n".join(lines)


# --- Atomic writes: the one way every file of a run is written ------------------------------


@contextlib.contextmanager
def atomic_path(path: Path):
    """A temporary name beside `path` (the same suffix, so Keras picks the format), moved onto `path` only
    when writing succeeded: a crash never leaves a half-written file under the real name."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    write_text(path, frame.to_csv(index=False))


if __name__ == "__main__":
    if "ipykernel" in sys.modules:
        main(show_plots=True)  # in a notebook an error shows as the cell's exception
    else:
        sys.exit(cli())

# %% [markdown]
# ## What the run wrote
#
# Everything is in `vae_outputs_v3/` (`/kaggle/working/vae_outputs_v3` on Kaggle): `OUTPUTS`, in the cell, lists
# every file and what it shows (README has them as a table).
#
# `decoder.predict(encoder.predict(x)[0])` denoises images `x` (N, 28, 28, 1) in [0, 1]. New images need only
# `decoder.keras` and `prior.npz`, the generator's mixture:
#
# ```python
# import keras, numpy as np
# decoder, prior = keras.models.load_model("decoder.keras"), np.load("prior.npz")
# rng = np.random.default_rng(0)
# k = rng.choice(len(prior["weights"]), size=16, p=prior["weights"])  # a component per sample, then a draw from it
# z = np.stack([rng.multivariate_normal(prior["means"][i], prior["covariances"][i]) for i in k])
# images = decoder.predict(z.astype("float32"), verbose=0)  # (16, 28, 28, 1) in [0, 1]
# ```
