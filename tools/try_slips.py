"""Issue 33's slip check: apply each one-line slip to a copy of vae_fashion.py and run the test module that must
catch it; prints CAUGHT or MISSED per slip (of issues 33, 38, 40 and 45; each takes 10-110 s on 2 cores).

    python3 tools/try_slips.py [SLIP NAME ...]

A slip whose text no longer occurs once in vae_fashion.py prints "??": update it with the code.
"""

import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
A, G, P, D = "tests/test_analysis_promises.py", "tests/test_generation.py", "tests/test_promises.py", "tests/test_data.py"
R = "tests/test_report_promises.py"
T, B = "tests/test_derived_figures.py", "tests/test_bad_input.py"
# (name, text in vae_fashion.py, the slip, the tests that must fail)
SLIPS = [
 ("decay over one epoch", 'max(1, steps * self.params["epochs"])', 'max(1, steps)', [P, "tests/test_copy_path.py"]),
 ("prior refitted by a later fit", "or self.model.prior.fitted:", ":", [P]),
 ("beta by a fixed epoch", "self.model.steps_per_epoch = steps", "self.model.steps_per_epoch = 235", ["tests/test_copy_path.py"]),
 ("no prior fit in fit", "callbacks.insert(1, FitPrior(x, self.config))", "pass", ["tests/test_copy_path.py"]),
 ("preset over named", '{"preset": preset, **PRESETS.get(preset, {}), **settings}', '{"preset": preset, **settings, **PRESETS.get(preset, {})}', ["tests/test_config.py"]),
 ("metrics.txt group order", 'table.groupby("group", sort=False)', 'table.groupby("group")', [R]),
 ("fit on test codes", "fit_generator(z_mean_train, config.expost_components", "fit_generator(z_mean_test, config.expost_components", [A]),
 ("prior_components", "z_mean_train, config.expost_components,", "z_mean_train, config.prior_components,", [A]),
 ("always fit", 'if config.generator == "expost":', "if True:", [A]),
 ("07 from trained prior", "generated_grid = vae.generate(vae.sample_generator(100", "generated_grid = vae.generate(vae.sample_prior(100", [A]),
 ("pca on train", "pca = PCA().fit(z_mean_test)", "pca = PCA().fit(z_mean_train)", [A]),
 ("probes on clean train", "z_mean_train, _ = vae.encode(data.x_train_noisy)", "z_mean_train, _ = vae.encode(data.x_train)", [A]),
 ("silhouette on train", "silhouette_score(z_test[subset], y_test[subset])", "silhouette_score(z_train[subset], y_train[subset])", [A]),
 ("knn k=5", "n_neighbors=min(10, len(z_train))", "n_neighbors=min(5, len(z_train))", [A]),
 ("classifier on test", "classifier.fit(data.x_train, data.y_train,", "classifier.fit(data.x_test, data.y_test,", [G]),
 ("generator stream", 'vae.sample_generator(n, seed_for(config, "prior_fd"))', 'vae.sample_generator(n, seed_for(config, "trained_prior_fd"))', [G]),
 ("swap sets", '("prior", samples), ("noisy", data.x_test_noisy),\n        ("trained_prior", trained_prior)', '("prior", trained_prior), ("noisy", data.x_test_noisy),\n        ("trained_prior", samples)', [G]),
 ("first training codes", 'codes = z_mean_train[seeded_subset(len(z_mean_train), n, seed_for(config, "training_codes"))]', "codes = z_mean_train[:n]", [G]),
 ("per-class FD vs train labels", "mine, theirs = intended == c, data.y_test[:n] == c", "mine, theirs = intended == c, data.y_train[:n] == c", [G]),
 ("sqrtm product", "root = linalg.sqrtm(cov_a @ cov_b)", "root = linalg.sqrtm(cov_a) @ linalg.sqrtm(cov_b)", [A]),
 ("class cov of all", "np.cov(z_train[y_train == c], rowvar=False) + ridge", "np.cov(z_train, rowvar=False) + ridge", [A]),
 ("supcon temperature", "supcon_loss(z_mean, labels, self.config.supcon_temperature)", "supcon_loss(z_mean, labels)", [P]),
 ("test labels from train", 'for a in (x_test, y_test))', 'for a in (x_test, y_train))', [D]),
 ("noise streams swapped", 'seed_for(config, "train_noise_fixed")),\n        x_test_noisy=add_noise(data.x_test, config.noise_factor, seed_for(config, "test_noise"))', 'seed_for(config, "test_noise")),\n        x_test_noisy=add_noise(data.x_test, config.noise_factor, seed_for(config, "train_noise_fixed"))', [A]),
 ("test noise 0.45", 'x_test_noisy=add_noise(data.x_test, config.noise_factor,', 'x_test_noisy=add_noise(data.x_test, 0.45,', [A]),
 ("nlm sigma fixed", "sigma = max(config.noise_factor, 1e-3)", "sigma = 0.45", [A]),
 ("vae subset first", '"vae_subset": denoised[subset],', '"vae_subset": denoised[: len(subset)],', [A]),
 ("density all codes", "codes = z_train[seeded_subset(len(z_train), size, seed)]", "codes = z_train", [A]),
 ("embedding labels first", "labels[subset],\n", "labels[: len(subset)],\n", [A]),
 ("tsne on all", 'project_tsne(z_mean_test[subset], seed_for(config, "tsne"))', 'project_tsne(z_mean_test, seed_for(config, "tsne"))', [A]),
 ("duplicate stream", '"expost_fit": 13', '"expost_fit": 12', [A]),
 ("stale files kept", 'for name in output_files():  # the checkpoint stays', 'for name in output_files()[-5:]:  # the checkpoint stays', [A]),
 ("prior.npz with N(0,I)", "    if generator is not None:\n        with atomic_path(out / \"prior.npz\")", "    if True:\n        generator = generator or {}\n        with atomic_path(out / \"prior.npz\")", [A]),
 ("metrics.csv before the text", '    report = metrics_report(results)\n    write_csv(out / "metrics.csv", results.metrics)\n    write_text(out / "metrics.txt", report)', '    write_csv(out / "metrics.csv", results.metrics)\n    write_text(out / "metrics.txt", metrics_report(results))', [R]),
 ("report before plots", '        with timer.stage("plots"):\n            render(results, out, show_plots)\n        with timer.stage("report"):\n            write_reports(results, out)', '        with timer.stage("report"):\n            write_reports(results, out)\n        with timer.stage("plots"):\n            render(results, out, show_plots)', [R]),
 ("silhouette count", '"silhouette": representation["silhouette_samples"]', '"silhouette": n_test', [R]),
 ("psnr unit", 'unit = "dB" if metric.startswith("psnr") else ""', 'unit = "dB" if metric == "psnr" else ""', [R]),
 ("pca from 0", "enumerate(zip(ratios, np.cumsum(ratios)), start=1)", "enumerate(zip(ratios, np.cumsum(ratios)), start=0)", [R]),
 ("estimate over all steps", "per_step = (time.perf_counter() - self.after_first_step) / (steps - 1)", "per_step = (time.perf_counter() - self.after_first_step) / steps", [R]),
 ("estimate left", "(self.epochs - epoch - 1))} from now", "(self.epochs - epoch))} from now", [R]),
 ("total from first stage", 'total = pd.DataFrame([{"stage": "total", "seconds": round(time.perf_counter() - self.start, 3)}])', 'total = pd.DataFrame([{"stage": "total", "seconds": round(sum(r["seconds"] for r in self.rows), 3)}])', [R]),
 ("high open", "or value > high:", "or value >= high:", [R]),
 ("open_low ignored", "if (value <= low if rule[\"open_low\"] else value < low)", "if (value < low)", [R]),
 ("test var name", 'take_first(a, config.test_samples, "VAE_TEST_SAMPLES")', 'take_first(a, config.test_samples, "VAE_TRAIN_SAMPLES")', [R]),
 ("ppid", '"pid": os.getpid(),', '"pid": os.getppid(),', [R]),
 # issue 40: a derived figure computed from a sibling; a diverged epoch backed up or resumed
 ("recon agreement is test accuracy", 'result["reconstruction_agreement"] = float(np.mean(sets["reconstruction"][1].argmax(axis=1) == data.y_test[:n]))', 'result["reconstruction_agreement"] = result["classifier_test_accuracy"]', [T]),
 ("gain from pooled", 'summary["vae_psnr"] - summary["noisy_psnr"]', 'summary["vae_psnr_pooled"] - summary["noisy_psnr"]', [T]),
 ("gain from both pooled", 'summary["vae_psnr"] - summary["noisy_psnr"]', 'summary["vae_psnr_pooled"] - summary["noisy_psnr_pooled"]', [T]),
 ("mse gain of clean input", '100.0 * (1.0 - summary["vae_mse"] / baseline)', '100.0 * (1.0 - summary["clean_input_mse"] / baseline)', [T]),
 ("ssim gain of clean input", 'summary["vae_ssim"] - summary["noisy_ssim"]', 'summary["clean_input_ssim"] - summary["noisy_ssim"]', [T]),
 ("per-class agreement is overall", 'float(np.mean(predicted[mine] == c))', 'result["conditional_agreement"]', [T]),
 ("classical reference first clean", 'image_quality(clean[subset], output)', 'image_quality(clean[: len(subset)], output)', [T]),
 ("ssim verdict from psnr", 'wide = table.pivot(index="sigma", columns="method", values=column)', 'wide = table.pivot(index="sigma", columns="method", values="psnr")', [T]),
 ("robustness VAE is noisy", '("VAE", denoise(noisy))', '("VAE", noisy)', [T]),
 ("robustness TV is VAE", '("TV (Chambolle)", denoise_tv(noisy))', '("TV (Chambolle)", denoise(noisy))', [T]),
 ("class FD mask swapped", '("conditional", conditional_features[mine])', '("conditional", conditional_features[theirs])', [T]),
 ("confidence of generator", 'float(probs.max(axis=1).mean())', 'float(sets["prior"][1].max(axis=1).mean())', [T]),
 ("clean-train FD on test", '("train", data.x_train), ("reconstruction", denoised)', '("train", data.x_test), ("reconstruction", denoised)', [T]),
 ("conditional FD of codes", '"fd_conditional_samples": frechet_distance(sets["conditional"][0], reference)', '"fd_conditional_samples": frechet_distance(sets["training_codes"][0], reference)', [T]),
 ("tv first images", '"tv_chambolle": denoise_tv(noisy[subset])', '"tv_chambolle": denoise_tv(noisy[: len(subset)])', [T]),
 ("classical count requested", 'return {"classical_samples": int(len(subset)),', 'return {"classical_samples": config.classical_samples,', [T]),
 ("silhouette count requested", '"silhouette_samples": int(len(subset)),', '"silhouette_samples": silhouette_samples,', [T]),
 ("diverged epoch backed up", "        if self.guard.failure is not None:\n            return\n        logs = logs or {}", "        logs = logs or {}", [B]),
 ("weights not checked", "if self.failure is None and not all(np.isfinite(w.numpy()).all() for w in self.model.weights):", "if False:", [B]),
 # issue 45: a mixture per class
 ("class mixtures pooled", "codes = z_train[y_train == c]", "codes = z_train", [A, G]),
 ("one Gaussian per class", "max(1, min(components, most))", "1", [A]),
 ("small-class rule without the mean", "most = min(len(codes), size) // (codes.shape[1] + 1)", "most = min(len(codes), size) // codes.shape[1]", [G]),
 ("small-class rule of all codes", "most = min(len(codes), size) // (codes.shape[1] + 1)", "most = len(codes) // (codes.shape[1] + 1)", [G]),
 ("samples of the first class's mixture", "sample_mixture(mixture, counts[c], rng)", "sample_mixture(mixtures[0], counts[c], rng)", [G]),
 ("uniform class counts", "class_images = np.bincount(data.y_test[:n], minlength=NUM_CLASSES)", "class_images = np.full(NUM_CLASSES, n // NUM_CLASSES)", [T]),
 ("class recon FD of samples", '("reconstruction", sets["reconstruction"][0][theirs])', '("reconstruction", conditional_features[mine])', [T]),
 ("class fit on the sampling stream", 'seed_for(config, "conditional_fit"))', 'seed_for(config, "conditional"))', [A]),
 ("class components from expost", "mixtures = class_mixtures(z_mean_train, data.y_train, config.conditional_components,", "mixtures = class_mixtures(z_mean_train, data.y_train, config.expost_components,", [A]),
 ("nan rows resumed", "rows = list(itertools.takewhile(lambda row: all(map(math.isfinite, row.values())), self.history()))", "rows = self.history()", [B]),
]


def main(only) -> int:
    src = (ROOT / "vae_fashion.py").read_text()
    missed = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp) / "repo"
        for name, old, new, tests in SLIPS:
            if only and name not in only:
                continue
            if src.count(old) != 1:
                print(f"?? {name}: its text occurs {src.count(old)} times", flush=True)
                continue
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.ipynb"))
            (work / "vae_fashion.py").write_text(src.replace(old, new))
            result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider",
                                     *tests], cwd=work, capture_output=True, text=True)
            last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-200:]
            missed += result.returncode == 0
            print(("CAUGHT " if result.returncode else "MISSED ") + name + " :: " + last, flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
