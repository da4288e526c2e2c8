"""Configuration from VAE_* environment variables."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest

import vae_fashion as vf


def test_defaults_are_the_seed_hyper_parameters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = vf.config_from_env({})
    assert (config.latent_dim, config.batch_size) == (16, 256)
    # The original's 20 epochs of a one-convolution-per-level model: 17 of a deeper one beat it (README).
    assert (config.epochs, config.encoder_depth, config.decoder_depth, config.output_layer) == (17, 2, 2, "subpixel")
    assert config.noise_factor == 0.45
    # The original's GAMMA_SC = 1.0 is in raw nats; scaled to the BCE term, 0.25 is the measured choice (README).
    assert (config.gamma_sc, config.supcon_scale, config.fresh_noise) == (0.25, "recon", True)
    assert (config.beta_max, config.warmup_epochs) == (1.0, 8)
    # the learned prior: its samples score near the reconstructions; the original's N(0, I) is the faithful preset's
    assert (config.prior, config.prior_components) == ("mixture", 10)
    assert vf.config_from_env({"VAE_PRESET": "faithful"}).prior == "normal"
    # samples from a mixture fitted to the training codes after training; the faithful preset samples N(0, I)
    assert (config.generator, config.expost_components) == ("expost", 80)
    assert vf.config_from_env({"VAE_PRESET": "faithful"}).generator == "prior"
    assert config.train_samples is None and config.test_samples is None
    assert config.data_dir is None


def test_outputs_go_to_kaggle_working_on_kaggle_and_to_the_working_folder_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setattr(vf, "KAGGLE_WORKING", tmp_path / "no-kaggle-here")
    assert vf.config_from_env({}).out_dir == "vae_outputs_v3"
    (tmp_path / "kaggle" / "working").mkdir(parents=True)
    monkeypatch.setattr(vf, "KAGGLE_WORKING", tmp_path / "kaggle" / "working")
    assert vf.config_from_env({}).out_dir == str(tmp_path / "kaggle" / "working" / "vae_outputs_v3")
    assert vf.config_from_env({"VAE_OUT_DIR": "/elsewhere"}).out_dir == "/elsewhere"


def test_every_documented_variable_overrides_its_setting():
    environ = {
        "VAE_EPOCHS": "3", "VAE_BATCH_SIZE": "64", "VAE_LATENT_DIM": "8", "VAE_NOISE_FACTOR": "0.3",
        "VAE_GAMMA_SC": "2.5", "VAE_BETA_MAX": "0.5", "VAE_WARMUP_EPOCHS": "0", "VAE_SEED": "7",
        "VAE_TRAIN_SAMPLES": "1000", "VAE_TEST_SAMPLES": " 500 ", "VAE_DATA_DIR": "/data",
        "VAE_OUT_DIR": "/out",
    }
    config = vf.config_from_env(environ)
    assert (config.epochs, config.batch_size, config.latent_dim) == (3, 64, 8)
    assert (config.noise_factor, config.gamma_sc, config.beta_max) == (0.3, 2.5, 0.5)
    assert (config.warmup_epochs, config.seed) == (0, 7)
    assert (config.train_samples, config.test_samples) == (1000, 500)
    assert (config.data_dir, config.out_dir) == ("/data", "/out")


def test_empty_variable_means_default():
    assert vf.config_from_env({"VAE_EPOCHS": "", "VAE_OUT_DIR": " "}).epochs == 17
    config = vf.config_from_env({"VAE_DATA_DIR": " ", "VAE_PRIOR": ""}, {})
    assert config.data_dir is None and config.prior == "mixture"  # searched, not the working folder; the default
    assert vf.config_from_env({}, {"data_dir": "", "out_dir": " "}).data_dir is None  # OVERRIDES' empty text too


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("VAE_EPOCHS", "abc", "VAE_EPOCHS='abc' is not a whole number"),
        ("VAE_EPOCHS", "2.5", "is not a whole number"),
        ("VAE_EPOCHS", "0", "VAE_EPOCHS='0' is out of range"),
        ("VAE_NOISE_FACTOR", "-1", "VAE_NOISE_FACTOR='-1' is out of range"),
        ("VAE_NOISE_FACTOR", "nan", "must be a finite number"),
        ("VAE_GAMMA_SC", "x", "VAE_GAMMA_SC='x' is not a number"),
        ("VAE_BATCH_SIZE", "1", "VAE_BATCH_SIZE='1' is out of range"),
        ("VAE_TEST_SAMPLES", "5", "VAE_TEST_SAMPLES='5' is out of range"),
        ("VAE_LEARNING_RATE", "0", "must lie in \\(0.0"),
        ("VAE_PRIOR", "flow", "VAE_PRIOR='flow' must be mixture or normal"),
        ("VAE_PRIOR_COMPONENTS", "0", "VAE_PRIOR_COMPONENTS='0' is out of range"),
        ("VAE_PRIOR_COMPONENTS", "2.5", "VAE_PRIOR_COMPONENTS='2.5' is not a whole number"),
        ("VAE_DEVICES", "both", "VAE_DEVICES='both' must be one or all"),
        ("VAE_GENERATOR", "flow", "VAE_GENERATOR='flow' must be expost or prior"),
        ("VAE_EXPOST_COMPONENTS", "0", "VAE_EXPOST_COMPONENTS='0' is out of range: it must lie in \\[1, 1000\\]"),
        ("VAE_EXPOST_COMPONENTS", "1001", "VAE_EXPOST_COMPONENTS='1001' is out of range"),
    ],
)
def test_bad_values_name_the_variable_and_the_default(name, value, message):
    with pytest.raises(vf.ConfigError, match=message) as info:
        vf.config_from_env({name: value})
    assert f"unset {name} to use the default" in str(info.value)


def test_an_on_off_setting_names_its_default_as_users_type_it():
    with pytest.raises(vf.ConfigError, match=r"VAE_FRESH_NOISE='yes' must be 0 or 1; unset VAE_FRESH_NOISE to use "
                       r"the default \(1\)"):
        vf.config_from_env({"VAE_FRESH_NOISE": "yes"})
    with pytest.raises(vf.ConfigError, match=r"remove 'fresh' from OVERRIDES to use the default \(0\)"):
        vf.config_from_env({}, {"fresh": "maybe"})


def test_config_json_records_the_variables_the_run_was_made_from(monkeypatch):
    """main(environ) runs with environ's settings, and config.json lists those, not the process's variables."""
    monkeypatch.setenv("VAE_EPOCHS", "9")
    seen = {}
    monkeypatch.setattr(vf, "run", lambda config, **kwargs: seen.update(config=config, **kwargs))
    vf.main({"VAE_EPOCHS": "3", "VAE_SEED": "7"})
    assert seen["config"].epochs == 3
    record = vf.effective_config_record(seen["config"], "float32", environ=seen["environ"])
    assert record["environment_variables"]["VAE_EPOCHS"] == "3" and record["environment_variables"]["VAE_SEED"] == "7"
    assert record["environment_variables"]["VAE_BATCH_SIZE"] is None


def _cli_error(tmp_path, monkeypatch, capsys, name, value):
    """Run the script entry point with one variable set; the exit code, its stderr, and whether it made
    the output folder."""
    out = tmp_path / "out"
    monkeypatch.setenv("VAE_OUT_DIR", str(out))
    monkeypatch.setenv(name, value)
    return vf.cli(), capsys.readouterr().err, out.exists()


def test_more_mixture_components_than_training_images_is_refused_before_any_work():
    with pytest.raises(vf.ConfigError, match="VAE_EXPOST_COMPONENTS=80 is more than the 50 training images"):
        vf.config_from_env({"VAE_TRAIN_SAMPLES": "50"})
    assert vf.config_from_env({"VAE_TRAIN_SAMPLES": "50", "VAE_GENERATOR": "prior"}).train_samples == 50
    assert vf.config_from_env({"VAE_TRAIN_SAMPLES": "80"}).expost_components == 80


def test_config_errors_stop_the_script_before_any_work(tmp_path, monkeypatch, capsys):
    code, err, made_output = _cli_error(tmp_path, monkeypatch, capsys, "VAE_EPOCHS", "abc")
    assert code == 2
    assert "ERROR: VAE_EPOCHS='abc' is not a whole number" in err
    assert not made_output


def test_effective_config_record_is_json_and_names_the_precision_the_run_trains_in(monkeypatch):
    monkeypatch.setenv("VAE_EPOCHS", "4")
    record = json.loads(json.dumps(vf.effective_config_record(vf.config_from_env())))
    assert record["config"]["epochs"] == 4
    assert record["environment_variables"]["VAE_EPOCHS"] == "4"
    assert record["versions"]["keras"].startswith("3.")
    assert record["dtype_policy"] in ("float32", "mixed_bfloat16", "mixed_float16")
    # the policy the run will train in, not whatever Keras holds when config.json is written (before setup)
    keras.mixed_precision.set_global_policy("float32")
    assert vf.effective_config_record(vf.Config(precision="mixed_bfloat16"))["dtype_policy"] == "mixed_bfloat16"
    monkeypatch.setattr(vf, "gpu_compute_capability", lambda: None)
    for prefers_bfloat16, policy in ((True, "mixed_bfloat16"), (False, "float32")):  # "auto" on a CPU
        monkeypatch.setattr(vf, "cpu_prefers_bfloat16", lambda cpuinfo=None, answer=prefers_bfloat16: answer)
        assert vf.effective_config_record(vf.Config())["dtype_policy"] == policy
    monkeypatch.setattr(vf, "gpu_compute_capability", lambda: (7, 5))  # a T4
    assert vf.effective_config_record(vf.Config())["dtype_policy"] == "mixed_float16"


def test_overrides_win_over_defaults_and_lose_to_the_environment():
    overrides = {"epochs": 5, "latent_dim": 8, "fresh": True, "train_samples": None}
    config = vf.config_from_env({"VAE_LATENT_DIM": "32"}, overrides)
    assert (config.epochs, config.latent_dim, config.fresh) == (5, 32, True)
    assert config.train_samples is None
    assert vf.config_from_env({}, {}).epochs == 17


def test_bad_overrides_name_the_entry_and_the_known_settings():
    with pytest.raises(vf.ConfigError, match="OVERRIDES\\['epochs'\\]='0' is out of range") as info:
        vf.config_from_env({}, {"epochs": 0})
    assert "remove 'epochs' from OVERRIDES to use the default (17)" in str(info.value)
    with pytest.raises(vf.ConfigError, match="unknown setting\\(s\\) epoch \\(did you mean epochs\\?\\);.*batch_size"):
        vf.config_from_env({}, {"epoch": 5})
    with pytest.raises(vf.ConfigError, match="OVERRIDES\\['lr_schedule'\\]='linear' must be cosine or constant"):
        vf.config_from_env({}, {"lr_schedule": "linear"})
    # the variable's name as a key, or a near miss, gets the key meant
    with pytest.raises(vf.ConfigError, match="VAE_FRESH \\(did you mean fresh\\?\\)"):
        vf.config_from_env({}, {"VAE_FRESH": 1})
    with pytest.raises(vf.ConfigError, match="frsh \\(did you mean fresh\\?\\)"):
        vf.config_from_env({}, {"frsh": 1})
    assert vf.config_from_env({}, {"fresh": 1}).fresh is True


def test_each_preset_resolves_to_its_documented_values():
    assert vf.config_from_env({"VAE_PRESET": "default"}) == vf.Config()
    faithful = vf.config_from_env({"VAE_PRESET": "faithful"})
    assert (faithful.supcon_scale, faithful.gamma_sc, faithful.fresh_noise) == ("none", 1.0, False)
    assert faithful.hidden_units == 128
    assert (faithful.learning_rate, faithful.lr_schedule, faithful.precision) == (0.001, "constant", "float32")
    assert (faithful.encoder_depth, faithful.decoder_depth, faithful.output_layer) == (1, 1, "conv")
    assert faithful.epochs == 20
    quality = vf.config_from_env({}, {"preset": "quality"})
    assert (quality.epochs, quality.latent_dim, quality.encoder_depth, quality.decoder_depth) == (40, 32, 2, 3)
    assert (quality.hidden_units, quality.output_layer) == (512, "subpixel")
    assert quality.batch_size == 256  # what the preset leaves alone keeps the default


def test_an_explicit_setting_overrides_the_preset():
    assert vf.config_from_env({"VAE_PRESET": "quality", "VAE_EPOCHS": "5"}).epochs == 5
    assert vf.config_from_env({"VAE_PRESET": "quality"}, {"latent_dim": 24}).latent_dim == 24
    assert vf.config_from_env({"VAE_EPOCHS": "7"}, {"preset": "quality"}).epochs == 7


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(vf.ConfigError, match="VAE_PRESET='fast' must be default, faithful or quality"):
        vf.config_from_env({"VAE_PRESET": "fast"})


def test_auto_precision_picks_bfloat16_only_where_it_was_measured_faster(monkeypatch):
    intel_amx = "vendor_id\t: GenuineIntel\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n"
    intel_bf16_only = "vendor_id\t: GenuineIntel\nflags\t\t: fpu avx512f avx512_bf16\n"
    amd_bf16 = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu avx512f avx512_bf16\n"
    amd_plain = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2\n"
    assert vf.cpu_prefers_bfloat16(intel_amx) and vf.cpu_prefers_bfloat16(amd_bf16)
    assert not vf.cpu_prefers_bfloat16(intel_bf16_only) and not vf.cpu_prefers_bfloat16(amd_plain)
    assert not vf.cpu_prefers_bfloat16("flags: avx512_bf16x amx_bf16_fake")  # whole words only
    monkeypatch.setattr(vf.Path, "read_text", lambda self: intel_amx if str(self) == "/proc/cpuinfo" else "")
    assert vf.cpu_prefers_bfloat16()  # this machine's own flags, when none are given

    def unreadable(self):
        raise PermissionError(f"{self}: denied")

    monkeypatch.setattr(vf.Path, "read_text", unreadable)
    assert not vf.cpu_prefers_bfloat16()  # flags it cannot read: float32


def test_an_unknown_vae_variable_stops_the_run_naming_the_setting_it_probably_meant(tmp_path, monkeypatch, capsys):
    with pytest.raises(vf.ConfigError, match="VAE_EPOCH \\(did you mean VAE_EPOCHS\\?\\)"):
        vf.config_from_env({"VAE_EPOCH": "5"})
    with pytest.raises(vf.ConfigError, match="unknown setting\\(s\\) VAE_COLOUR;"):
        vf.config_from_env({"VAE_COLOUR": "red"})
    assert vf.config_from_env({"OTHER_EPOCH": "5"}).epochs == 17  # only VAE_* names are ours
    code, err, made_output = _cli_error(tmp_path, monkeypatch, capsys, "VAE_EPOCH", "5")
    assert code == 2
    assert "VAE_EPOCH (did you mean VAE_EPOCHS?)" in err
    assert not made_output


def test_every_setting_is_declared_once_with_its_variable_group_and_meaning():
    groups = ["preset", "data", "model", "loss", "optimisation", "generation", "evaluation", "output"]
    assert [rule["group"] for rule in vf.SETTINGS.values()] == sorted(
        (rule["group"] for rule in vf.SETTINGS.values()), key=groups.index)  # fields in group order
    for field, rule in vf.SETTINGS.items():
        assert rule["env"] == f"VAE_{field.upper()}"
        assert rule["meaning"] and "\n" not in rule["meaning"] and "(the original" not in rule["meaning"], field
    # every variable reaches its field, and the fingerprint holds exactly the settings that train
    assert vf.config_from_env({"VAE_FRESH": "1", "VAE_DEVICES": "all"}).fresh is True
    trained = {field for field, rule in vf.SETTINGS.items() if rule["trains"]}
    assert set(vf.training_fingerprint(vf.Config())) == trained | {"replicas"}
    assert {"epochs", "latent_dim", "seed", "precision"} <= trained and not {"out_dir", "devices", "preset"} & trained
    assert not {"generator", "expost_components"} & trained  # fitted after training: a rerun reuses the training


def test_a_setting_s_kind_is_its_default_s_type_unless_declared():
    field = vf.setting(3, "model", "m")
    assert field.default == 3 and field.metadata["kind"] is int and field.metadata["trains"] is True
    assert vf.setting(None, "data", "d", str).metadata["kind"] is str
    assert dict(vf.setting(0.5, "loss", "l", low=0, high=1, open_low=True, trains=False).metadata) == {
        "group": "loss", "meaning": "l", "kind": float, "low": 0, "high": 1, "open_low": True, "trains": False}


def test_preset_values_pass_the_same_validation(monkeypatch):
    monkeypatch.setitem(vf.PRESETS, "quality", {"epochs": 0})
    with pytest.raises(vf.ConfigError, match="PRESETS\\['quality'\\]\\['epochs'\\]='0' is out of range"):
        vf.config_from_env({"VAE_PRESET": "quality"})
    monkeypatch.setitem(vf.PRESETS, "quality", {"epoch": 30})
    with pytest.raises(vf.ConfigError, match="PRESETS\\['quality'\\] names unknown setting\\(s\\) epoch"):
        vf.config_from_env({"VAE_PRESET": "quality"})


def test_config_itself_applies_the_preset_and_checks_every_value():
    """A copied cell has no config_from_env: Config(preset=...) applies the preset, the settings named win, and
    a value out of its declaration is refused."""
    faithful = vf.Config(preset="faithful")
    assert (faithful.epochs, faithful.prior, faithful.lr_schedule) == (20, "normal", "constant")
    assert vf.Config(preset="faithful", epochs=5, prior="mixture").epochs == 5
    assert vf.Config(preset="faithful", epochs=5, prior="mixture").prior == "mixture"
    assert vf.Config(preset="faithful") == vf.config_from_env({"VAE_PRESET": "faithful"}, {})  # one path
    assert vf.Config(fresh_noise=0).fresh_noise is False
    for settings, message in (({"epochs": 0}, r"Config\(epochs=0\) is out of range: it must lie in \[1, 10000\]"),
                              ({"epochs": 2.5}, r"Config\(epochs=2.5\) is not a whole number"),
                              ({"prior": "flow"}, r"Config\(prior='flow'\) must be mixture or normal"),
                              ({"preset": "fast"}, r"Config\(preset='fast'\) must be default, faithful or quality"),
                              ({"fresh": 2}, r"Config\(fresh=2\) must be 0 or 1")):
        with pytest.raises(vf.ConfigError, match=message):
            vf.Config(**settings)
    with pytest.raises(TypeError, match="epoch"):
        vf.Config(epoch=3)
    # numpy numbers and paths become the plain values config.json records; an empty out_dir is the default
    config = vf.Config(epochs=np.int64(3), learning_rate=1, fresh=np.bool_(True), data_dir=Path("/data"))
    assert (config.epochs, config.learning_rate, config.fresh, config.data_dir) == (3, 1.0, True, "/data")
    assert type(config.epochs) is int and type(config.learning_rate) is float
    json.dumps(vf.dataclasses.asdict(config))
    assert vf.config_from_env({}, {"out_dir": " "}).out_dir == str(vf.default_out_dir())
