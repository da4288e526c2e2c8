"""Write what is made from the code into README.md: the settings (from Config), the outputs (from OUTPUTS) and
the results (from the committed runs), then regenerate vae_fashion.ipynb with jupytext. The tests fail, naming
this script, when one is stale.

    python3 tools/sync_docs.py
"""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

import vae_fashion as vf  # noqa: E402


def presets_text() -> str:
    """What each preset sets, made from PRESETS."""
    return "; ".join(f"{name}: " + (", ".join(f"{key} {int(value) if isinstance(value, bool) else value}"
                                             for key, value in values.items()) or "the defaults")
                     for name, values in vf.PRESETS.items())


def settings_table() -> str:
    """README's settings table: one row per group, each setting with its default and meaning (the preset's with
    what each preset sets)."""
    groups: dict[str, list[str]] = {}
    for name, rule in vf.SETTINGS.items():
        meaning = f"{rule['meaning']} ({presets_text()})" if name == "preset" else rule["meaning"]
        groups.setdefault(rule["group"], []).append(f"`{name}` **{vf.shown_default(rule)}**: {meaning}")
    return "\n".join(["| group | setting **default**: meaning |", "|---|---|"]
                     + [f"| {group} | {'; '.join(cells)} |" for group, cells in groups.items()])


def outputs_table() -> str:
    """README's outputs table, made from OUTPUTS."""
    rows = ["| file | what it shows | written by |", "|---|---|---|"]
    for output in vf.OUTPUTS:
        by = output.draw.__name__ if output.draw else output.written_by
        rows.append(f"| {', '.join(f'`{name}`' for name in output.files)} | {output.shows} | `{by}` |")
    return "\n".join(rows)


# README's results: docs/runs/<folder> holds the metrics.csv, config.json and timings.csv of one full run of the
# current code, each a column; the noisy input and the training-free denoisers come from the first run.
RUNS = {"default-42": "default, seed 42", "default-7": "default, seed 7", "prior-normal-42": "`PRIOR=normal`",
        "faithful-42": "`PRESET=faithful`"}
RESULT_ROWS = [  # label, the figure of the noisy / TV / NLM columns and of each run, its format
    ("PSNR, mean of per-image (dB)", ("noisy_psnr", "tv_chambolle_psnr", "nl_means_psnr"), "vae_psnr", ".2f"),
    ("PSNR, pooled over all pixels (dB)", ("noisy_psnr_pooled", "tv_chambolle_psnr_pooled", "nl_means_psnr_pooled"),
     "vae_psnr_pooled", ".2f"),
    ("SSIM", ("noisy_ssim", "tv_chambolle_ssim", "nl_means_ssim"), "vae_ssim", ".3f"),
    ("linear probe / kNN (k = 10) accuracy", (), ("linear_probe_accuracy", "knn10_accuracy"), ".3f"),
    ("silhouette", (), "silhouette", ".3f"),
    ("FD of the reconstructions (noisy: of the input)", ("fd_noisy_input",), "fd_vae_reconstruction", ".1f"),
    ("FD of the generated samples ÷ the reconstructions'", (), "fd_prior_samples", "ratio"),
    ("FD of the trained prior's samples ÷ the reconstructions'", (), "fd_trained_prior_samples", "ratio"),
]


def committed_run(folder: str) -> dict:
    """One committed run: its figures and image counts by name, its config.json, its seconds per stage."""
    root = ROOT / "docs" / "runs" / folder
    metrics = pd.read_csv(root / "metrics.csv").set_index("name")
    timings = pd.read_csv(root / "timings.csv").set_index("stage")["seconds"].to_dict()
    return {"metrics": metrics["value"].to_dict(), "n_images": metrics["n_images"].to_dict(),
            "config": json.loads((root / "config.json").read_text()), "timings": timings}


def run_command(record: dict) -> str:
    variables = {k: v for k, v in record["environment_variables"].items() if v and k != "VAE_OUT_DIR"}
    return " ".join([*(f"{k}={v}" for k, v in variables.items()), "python3 vae_fashion.py"])


def results_table() -> str:
    """README's results table, made from the committed runs of RUNS."""
    runs = {folder: committed_run(folder) for folder in RUNS}
    first = runs[next(iter(RUNS))]  # gives the noisy input's and the training-free denoisers' columns
    reference = first["metrics"]
    rows = ["| | noisy input | TV (Chambolle)¹ | non-local means¹ | " + " | ".join(RUNS.values()) + " |",
            "|---" * (4 + len(RUNS)) + "|"]
    for label, references, name, form in RESULT_ROWS:
        cells = [format(reference[r], form) for r in references] + [""] * (3 - len(references))
        for run in runs.values():
            figures = run["metrics"]
            if form == "ratio":
                cells.append(f"{figures[name] / figures['fd_vae_reconstruction']:.3f}" if name in figures else "")
            else:
                cells.append(" / ".join(format(figures[n], form) for n in ((name,) if isinstance(name, str) else name)))
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    walls = [f"{run['timings']['total'] / 60:.1f} min, {run['config']['dtype_policy']}" for run in runs.values()]
    rows.append("| run's time (`timings.csv` total), precision | | | | " + " | ".join(walls) + " |")
    cpus = sorted({run["config"]["cpu"] for run in runs.values()})
    commands = "; ".join(f"{label.strip('`')}: `{run_command(runs[folder]['config'])}`"
                         for folder, label in RUNS.items())
    subset = first["n_images"]["tv_chambolle_psnr"]
    return "\n".join(rows) + (
        f"\n\n¹ On the seeded subset of {subset} test images of the first column's run, which also gives the noisy "
        f"input's figures. Each column is one full run (60 000 / 10 000 images) of the current code on 2 cores of "
        f"{', '.join(cpus)} ([docs/RESULTS.md](docs/RESULTS.md#current-results): commit, seed spread); its "
        "`metrics.csv` (every figure with its definition), `config.json` and `timings.csv` are in "
        "[docs/runs/](docs/runs). PSNR and SSIM: against the clean test images (scikit-image, data range 1). FD: "
        "Fréchet distance to the clean test images of the 64-d features of a small CNN trained in the run, 10 000 "
        "images a set; not comparable with published FIDs. The run's time is not a model's cost: `PRIOR=normal` "
        f"stepped at the default's rate, the rest of its training stage is unexplained. Commands: {commands}.")


# marker name -> the table in README.md
README_TABLES = {"settings": settings_table, "outputs": outputs_table, "results": results_table}


def replace_table(text: str, name: str, table: str) -> str:
    """The block after the marker line `<!-- <name> table -->` is replaced by `table`: up to the line
    `<!-- /<name> table -->` where there is one, else up to the first blank line."""
    marker, end = f"<!-- {name} table -->\n", f"<!-- /{name} table -->\n"
    if marker not in text:
        raise SystemExit(f"no '{marker.strip()}' line to put the {name} table after")
    head, rest = text.split(marker, 1)
    old = rest[: rest.index(end)] if end in rest else re.match(r"(?:\S.*\n|  .*\n)*", rest).group(0)  # to a blank
    return head + marker + table.rstrip() + "\n" + rest[len(old):]


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    for name, make in README_TABLES.items():
        text = replace_table(text, name, make())
    readme.write_text(text, encoding="utf-8")
    notebook = [sys.executable, "-m", "jupytext", "--to", "ipynb", "--update", "vae_fashion.py"]
    subprocess.run(notebook, check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
