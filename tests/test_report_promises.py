"""Promises of the reports (section 7), run() (section 8) and the appendix's settings and timers that a one-line
slip would break while a run still finishes: the order of the stages and files, the counts and units of
metrics.csv, the columns of metrics.txt, the bounds of every setting, the time estimate."""

import datetime
import json
import os
import re
import types

import numpy as np
import pandas as pd
import pytest

import vae_fashion as vf
from conftest import bars_data


def _metrics_values():
    """A distinct value for every metric, and the counts of each kind of image set."""
    values = {name: float(i + 1) for i, name in enumerate(vf.METRICS)}
    representation = {name: values[name] for name in ("linear_probe_accuracy", "knn10_accuracy", "silhouette")}
    classical = {name: value for name, value in values.items() if vf.METRICS[name][2] == "classical"}
    generation = {name: value for name, value in values.items()
                  if vf.METRICS[name][2] == "generation" or vf.METRICS[name][2].startswith("class ")}
    summary = {name: value for name, value in values.items() if vf.METRICS[name][2] == "test"
               and name not in representation}
    table = vf.metrics_table(summary, {**representation, "silhouette_samples": 7}, 100,
                             {**classical, "classical_samples": 20},
                             {**generation, "fd_samples": 50, "class_images": list(range(3, 13))})
    return values, table


def test_metrics_csv_names_each_figure_with_its_own_value_unit_and_image_count():
    values, table = _metrics_values()
    assert list(table["name"]) == list(vf.METRICS)
    rows = table.set_index("name")
    for name, row in rows.iterrows():
        assert row["value"] == values[name], name
        assert row["unit"] == ("dB" if "psnr" in name else "%" if name == "mse_improvement_pct" else ""), name
    expected = {"vae_psnr": 100, "noisy_ssim": 100, "psnr_gain_db": 100, "clean_input_psnr_pooled": 100,
                "linear_probe_accuracy": 100, "knn10_accuracy": 100, "silhouette": 7, "tv_chambolle_psnr": 20,
                "vae_subset_mse": 20, "noisy_subset_psnr_pooled": 20, "fd_prior_samples": 50,
                "fd_vae_reconstruction": 50, "reconstruction_agreement": 50, "fd_conditional_3": 6,
                "fd_reconstruction_3": 6, "conditional_agreement_9": 12, "fd_reconstruction_0": 3}
    assert {name: rows.loc[name, "n_images"] for name in expected} == expected


def test_an_image_set_s_metrics_rows_give_each_measure_its_unit_images_and_definition():
    """quality_rows: four rows per image set, named {set}_{measure}, in dB for the two PSNRs, each under the
    set's group and naming the images it counts (written out here by hand)."""
    rows = vf.quality_rows(("noisy", "tv_chambolle"))
    assert list(rows) == ["noisy_mse", "noisy_psnr", "noisy_ssim", "noisy_psnr_pooled", "tv_chambolle_mse",
                          "tv_chambolle_psnr", "tv_chambolle_ssim", "tv_chambolle_psnr_pooled"]
    assert [row[1] for row in rows.values()] == ["", "dB", "", "dB"] * 2
    assert rows["noisy_ssim"][:3] == ("denoising", "", "test")
    assert rows["noisy_ssim"][3] == ("mean over the images of skimage structural_similarity(clean, image, "
                                     "data_range=1), of the noisy input, on the test images")
    assert rows["tv_chambolle_psnr"][:3] == ("classical", "dB", "classical")
    assert rows["tv_chambolle_psnr"][3].endswith(", on the seeded classical-reference test subset")


def test_metrics_txt_gives_every_figure_of_metrics_csv_its_own_row_under_its_group_and_names_the_noise():
    values, table = _metrics_values()
    table["value"] = table["value"] / 7  # values with many digits, each its own
    config = vf.Config(noise_factor=0.3, seed=11)
    robustness = pd.DataFrame({"sigma": [0.3, 0.3, 0.3], "method": ["noisy input", "TV (Chambolle)", "VAE"],
                               "psnr": [10.0, 12.0, 18.0], "ssim": [0.3, 0.4, 0.6], "mse": [0.1, 0.06, 0.02],
                               "n_images": [40, 40, 40]})
    results = types.SimpleNamespace(metrics=table, config=config, source="bars", n_train=600, y_test=np.zeros(100),
                                    robustness=robustness, warnings=["UMAP was not written"])
    lines = vf.metrics_report(results).splitlines()
    groups = set(table["group"])
    for row in table.itertuples():
        at = [i for i, line in enumerate(lines) if line.split()[:1] == [row.name]]
        assert len(at) == 1, row.name
        shown = lines[at[0]].split()
        assert float(shown[1]) == pytest.approx(row.value, rel=1e-5), row.name
        assert int(shown[-1]) == row.n_images, row.name
        assert next(line for line in reversed(lines[:at[0]]) if line in groups) == row.group, row.name
    # each group once, in metrics.csv's order
    assert [line for line in lines if line in groups] == list(dict.fromkeys(table["group"]))
    text = "\n".join(lines)
    assert "600 training and 100 test images from bars" in text and "clip(x + 0.3 * N(0,1), 0, 1)" in text
    assert "trained at sigma 0.3" in text and "PSNR: the VAE beats TV at every sigma measured" in text
    assert "- UMAP was not written" in text
    assert robustness.to_string(index=False) in text  # noise_robustness.csv's table as it is, no row numbers


def test_the_pca_report_counts_components_from_one_and_sums_the_first_two():
    report = vf.pca_report(np.array([0.5, 0.3, 0.2]))
    assert re.findall(r"^PC(\d+) +([\d.]+) +([\d.]+)$", report, re.M) == [
        ("1", "0.50000", "0.50000"), ("2", "0.30000", "0.80000"), ("3", "0.20000", "1.00000")]
    assert "show 80.0 % of the variance" in report


def test_a_report_that_cannot_be_made_leaves_no_metrics_file(tmp_path):
    """README: a failed run leaves no metrics.csv/metrics.txt; write_reports makes the text before either."""
    _values, table = _metrics_values()
    broken = table[table["name"] != "fd_vae_reconstruction"]
    results = types.SimpleNamespace(metrics=broken, config=vf.Config(), source="bars", n_train=600,
                                    robustness=pd.DataFrame(), warnings=[], history=pd.DataFrame(),
                                    y_test=np.zeros(100),
                                    pca_ratios=np.array([0.6, 0.4]))
    with pytest.raises(KeyError):  # robustness_summary: no rows to rank
        vf.write_reports(results, tmp_path)
    assert not (tmp_path / "metrics.csv").exists() and not (tmp_path / "metrics.txt").exists()


class _Clock:
    def __init__(self, now=0.0):
        self.now = now

    def __call__(self):
        return self.now


def test_stage_timer_keeps_seconds_per_stage_and_the_total_since_it_started(monkeypatch):
    clock = _Clock(1.0)
    monkeypatch.setattr(vf.time, "perf_counter", clock)
    timer = vf.StageTimer()
    clock.now = 2.0
    with timer.stage("a"):
        clock.now = 4.0
    with timer.stage("b"):
        clock.now = 7.0
    frame = timer.frame()
    assert frame.values.tolist() == [["a", 2.0], ["b", 3.0], ["total", 6.0]]


def test_the_time_estimate_counts_the_steps_after_the_first_and_the_epochs_left(monkeypatch, capsys):
    """After the first epoch of this fit (epoch 2 of 10 after a resume): ms per step from the steps after the
    first, all epochs' time and what is left."""
    clock = _Clock(0.0)
    monkeypatch.setattr(vf.time, "perf_counter", clock)
    monkeypatch.setattr(vf, "cpu_model_name", lambda: "a CPU")
    estimate = vf.TrainingTimeEstimate(epochs=10)
    estimate.set_params({"steps": 5})
    estimate.on_epoch_begin(2)
    clock.now = 3.0  # the first step traced the graph
    estimate.on_train_batch_end(0)
    estimate.on_train_batch_end(1)
    clock.now = 7.0  # four more steps of one second
    estimate.on_epoch_end(2)
    printed = capsys.readouterr().out
    assert "1000 ms per step" in printed and "the 10 epochs take about 50 s" in printed
    assert "35 s from now" in printed  # epochs 4-10 of 10 (counting from 1): 7 x 5 s
    estimate.on_epoch_begin(3)
    estimate.on_epoch_end(3)
    assert capsys.readouterr().out == ""
    # minutes from 120 s on; two steps are enough to time one; at one second a step
    for steps, epochs, expected in ((4, 30, "take about 2.0 min on this machine, 116 s from now"),
                                    (6, 50, "take about 5.0 min on this machine, 4.9 min from now"),
                                    (7, 17, "take about 119 s on this machine, 112 s from now"),
                                    (2, 3, "take about 6 s on this machine, 4 s from now"), (1, 3, "")):
        estimate = vf.TrainingTimeEstimate(epochs=epochs)
        estimate.set_params({"steps": steps})
        clock.now = 0.0
        estimate.on_train_batch_end(0)
        clock.now = steps - 1.0
        estimate.on_epoch_end(0)
        printed = capsys.readouterr().out
        assert expected in printed and bool(printed) == bool(expected)  # one step: nothing to time it by


BOUNDED = [field for field, rule in vf.SETTINGS.items() if rule["low"] is not None]


@pytest.mark.parametrize("field", BOUNDED)
def test_every_bound_bounds_and_admits_its_edges(field):
    """parse_setting: [low, high], or (low, high] with open_low; the edges of each declared setting."""
    rule = vf.SETTINGS[field]
    low, high = rule["low"], rule["high"]
    step = 1 if rule["kind"] is int else max(abs(high), 1.0) * 1e-9

    def parse(value):
        return vf.parse_setting(field, str(value), rule["env"], "unset it")

    assert parse(high) == high
    with pytest.raises(vf.ConfigError, match=rf"{rule['env']}=.* is out of range"):
        parse(high + (1 if rule["kind"] is int else max(abs(high), 1.0) * 1e-6))
    if rule["open_low"]:
        with pytest.raises(vf.ConfigError, match="out of range"):
            parse(low)
        assert parse(low + step) > low
    else:
        assert parse(low) == low
        with pytest.raises(vf.ConfigError, match="out of range"):
            parse(low - (1 if rule["kind"] is int else 1e-6))


def test_a_test_split_too_large_names_its_own_variable(dataset_dir):
    with pytest.raises(vf.ConfigError, match="VAE_TEST_SAMPLES=201 is larger than the 200"):
        vf.load_fashion_mnist(vf.Config(data_dir=str(dataset_dir), test_samples=201))


def test_run_goes_through_its_stages_in_order_and_marks_the_folder_at_the_end(monkeypatch, tmp_path):
    """run(): load -> noise -> build -> train -> analyse -> save models -> plots -> report; run_status.json
    `running` with this process's pid until `finished`, the same started_at; timings.csv in stage order;
    config.json and the checkpoint's fingerprint name the precision that ran. A drawing that fails leaves no
    metrics file and the status `failed`."""
    data, vae, history = bars_data(40, 20), object(), pd.DataFrame({"epoch": [1]})
    calls, statuses, received = [], [], {}

    def record(name, result=None):
        def stage(*args, **kwargs):
            calls.append(name)
            received[name] = args
            statuses.append(json.loads((tmp_path / "run_status.json").read_text()))
            return result
        return stage

    def analyse(*args):
        calls.append("analyse")
        received["analyse"] = args
        with args[-1]("evaluate"):
            pass
        return types.SimpleNamespace(metrics=pd.DataFrame({"name": ["x"]}), warnings=[])

    def write_reports(results, out):
        calls.append("report")
        (out / "metrics.csv").write_text("name\nx\n")
        (out / "metrics.txt").write_text("report\n")

    monkeypatch.setattr(vf, "load_fashion_mnist", record("load", data))
    monkeypatch.setattr(vf, "build_distributed_vae", record("build", vae))
    monkeypatch.setattr(vf, "train_vae", record("train", history))
    monkeypatch.setattr(vf, "analyse", analyse)
    monkeypatch.setattr(vf, "save_models", record("save models"))
    monkeypatch.setattr(vf, "render", record("plots"))
    monkeypatch.setattr(vf, "write_reports", write_reports)
    config = vf.Config(out_dir=str(tmp_path), precision="mixed_bfloat16")
    vf.run(config)
    assert calls == ["load", "build", "train", "analyse", "save models", "plots", "report"]
    # each stage is handed what the one before made: the model trains from the noisy copy to the clean images
    trained, noisy, clean, labels = received["train"][:4]
    assert trained is vae and clean is data.x_train and labels is data.y_train
    assert noisy.shape == clean.shape and 0 < np.abs(noisy - clean).mean() < 0.5
    (analysed, noised, analysed_history, analysed_config, _stage) = received["analyse"]
    assert analysed is vae and noised.x_train_noisy is noisy and analysed_history is history
    assert analysed_config == config
    assert received["save models"] == (vae, tmp_path)
    assert received["plots"][1:] == (tmp_path, False)
    assert {(s["status"], s["pid"]) for s in statuses} == {("running", os.getpid())}
    final = json.loads((tmp_path / "run_status.json").read_text())
    assert final["status"] == "finished" and final["started_at"] == statuses[0]["started_at"]
    started, updated = (datetime.datetime.fromisoformat(final[k]) for k in ("started_at", "updated_at"))
    utc = datetime.timezone.utc
    assert started.tzinfo == utc and started <= updated <= datetime.datetime.now(utc)
    stages = pd.read_csv(tmp_path / "timings.csv")["stage"].tolist()
    assert stages == ["load", "noise", "build", "train", "evaluate", "save models", "plots", "report", "total"]
    assert json.loads((tmp_path / "config.json").read_text())["dtype_policy"] == "mixed_bfloat16"
    assert json.loads((tmp_path / "checkpoint" / "fingerprint.json").read_text())["precision"] == "mixed_bfloat16"

    def broken_render(*args):
        raise RuntimeError("a figure failed")

    monkeypatch.setattr(vf, "render", broken_render)
    with pytest.raises(RuntimeError):
        vf.run(config)
    assert not (tmp_path / "metrics.csv").exists() and not (tmp_path / "metrics.txt").exists()
    assert json.loads((tmp_path / "run_status.json").read_text())["status"] == "failed"
