"""The figures show the numbers and images they name: each drawing function is given hand-made results and its
figure is read back (bar heights, line data, the image mosaic, titles, labels, legends, pixel sizes), checked
against values computed here. Nothing runs a model."""

import types

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

import vae_fashion as vf


@pytest.fixture
def figures(monkeypatch):
    """The figures the drawing functions save, by file name, instead of files."""
    saved = {}
    monkeypatch.setattr(vf, "save_figure", lambda fig, path, show=False, tight=True: saved.__setitem__(
        str(path), (fig, tight)))
    yield saved
    for fig, _tight in saved.values():
        vf.plt.close(fig)


def texts(fig) -> list[str]:
    """Every title, label, tick label, legend entry and free text of the figure."""
    found = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_position"))]
    return [t for t in found if t]


def bar_heights(ax) -> list[float]:
    return [patch.get_height() for patch in ax.patches]


def test_per_class_psnr_draws_each_class_s_mean_psnr_of_the_noisy_input_and_the_vae(figures):
    labels = np.array([0, 0, 2, 2, 2, 5])  # classes 1, 3, 4 have no test image: no bars
    noisy = np.array([10.0, 12.0, 8.0, 9.0, 10.0, 20.0])
    vae = np.array([20.0, 22.0, 18.0, 15.0, 18.0, 30.0])
    results = types.SimpleNamespace(y_test=labels, quality={"noisy": {"psnr": noisy}, "vae": {"psnr": vae}})
    vf.draw_per_class_psnr(results, ["10.png"])
    fig, tight = figures["10.png"]
    ax = fig.axes[0]
    assert tight
    heights = bar_heights(ax)
    assert heights == pytest.approx([11.0, 9.0, 20.0, 21.0, 17.0, 30.0])  # noisy of 0, 2, 5, then the VAE's
    noisy_x, vae_x = ([p.get_x() + p.get_width() / 2 for p in ax.patches[i:i + 3]] for i in (0, 3))
    assert noisy_x == pytest.approx([-0.2, 0.8, 1.8]) and vae_x == pytest.approx([0.2, 1.2, 2.2])
    spans = sorted((min(p.get_x(), p.get_x() + p.get_width()), max(p.get_x(), p.get_x() + p.get_width()))
                   for p in ax.patches)
    assert all(left[1] <= right[0] + 1e-9 for left, right in zip(spans, spans[1:]))  # side by side, none hidden
    assert [t.get_text() for t in ax.texts] == ["21.0", "17.0", "30.0"]  # the VAE's bars carry their values
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"{vf.CLASS_NAMES_TR[c]}\n({vf.CLASS_NAMES_EN[c]})"
                                                           for c in (0, 2, 5)]
    assert ax.get_ylim() == pytest.approx((0, 1.25 * 30.0))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["noisy input", "VAE: decoder(z_mean)"]
    assert (ax.get_title(), ax.get_ylabel()) == ("Denoising quality per class (test set)", "mean PSNR (dB)")


def _generation(config):
    generation = {"fd_clean_train": 1.0, "fd_vae_reconstruction": 2.0, "fd_training_codes": 3.0,
                  "fd_prior_samples": 4.0, "fd_trained_prior_samples": 5.0, "fd_conditional_samples": 6.0,
                  "fd_noisy_input": 70.0, "fd_samples": 200}
    for i, name in enumerate(("prior", "trained_prior")):
        generation.update({f"{name}_class_entropy": 0.5 + i / 10, f"{name}_mean_confidence": 0.25 + i / 10,
                           f"{name}_class_counts": list(range(i, 10 + i))})
    return generation


@pytest.mark.parametrize("generator", ["expost", "prior"])
def test_generation_quality_draws_every_distance_and_the_classes_of_the_samples(figures, generator):
    config = vf.Config(generator=generator, prior="mixture", prior_components=7, expost_components=3)
    generation = _generation(config)
    vf.draw_generation_quality(types.SimpleNamespace(config=config, generation=generation), ["09.png"])
    ax, ax2 = figures["09.png"][0].axes
    keys = ["fd_clean_train", "fd_vae_reconstruction", "fd_training_codes", "fd_prior_samples",
            "fd_trained_prior_samples", "fd_conditional_samples", "fd_noisy_input"]
    if generator == "prior":  # the trained prior is the generator: drawn once
        keys.remove("fd_trained_prior_samples")
    assert bar_heights(ax) == pytest.approx([generation[key] for key in keys])
    assert [t.get_text() for t in ax.texts] == [f"{generation[key]:.2f}" for key in keys]
    names = [t.get_text() for t in ax.get_xticklabels()]
    assert names[3] == ("ex-post GMM\n(3)" if generator == "expost" else "trained prior")
    assert names.count("trained prior") == 1 and len(names) == len(keys)
    assert ax.get_yscale() == "log" and "n=200" in ax.get_title()
    assert ax.get_xlabel() == "per class: fd_conditional_<c> beside fd_reconstruction_<c> in metrics.csv"

    histograms = ["prior", "trained_prior"] if generator == "expost" else ["prior"]
    width = 0.8 / len(histograms)
    for i, name in enumerate(histograms):
        drawn = ax2.patches[10 * i:10 * (i + 1)]
        assert [p.get_height() for p in drawn] == generation[f"{name}_class_counts"]
        offset = (i - (len(histograms) - 1) / 2) * width
        assert [p.get_x() + p.get_width() / 2 for p in drawn] == pytest.approx(np.arange(10) + offset)
        assert [p.get_width() for p in drawn] == pytest.approx([width] * 10)
    assert len(ax2.patches) == 10 * len(histograms)
    (uniform,) = ax2.get_lines()
    assert uniform.get_ydata()[0] == pytest.approx(20.0) and uniform.get_linewidth() > 0  # 200 over 10 classes
    highest = max(max(generation[f"{name}_class_counts"]) for name in histograms)
    assert ax2.get_ylim() == pytest.approx((0, 1.45 * highest))
    legend = [t.get_text() for t in ax2.get_legend().get_texts()]
    assert legend[1] == ("ex-post GMM (3): entropy 0.50, confidence 0.25" if generator == "expost"
                         else "trained prior: entropy 0.50, confidence 0.25")
    assert legend[0] == "uniform" and len(legend) == len(histograms) + 1
    assert (ax2.get_title(), ax2.get_xlabel(), ax2.get_ylabel()) == (
        "Classes of the samples, as the classifier labels them", "predicted class", "count")
    if generator == "expost":
        assert legend[2] == "trained prior: entropy 0.60, confidence 0.35"
    assert [t.get_text() for t in ax2.get_xticklabels()] == vf.CLASS_NAMES_TR


def test_generation_quality_draws_nothing_without_generation_metrics(figures):
    vf.draw_generation_quality(types.SimpleNamespace(config=vf.Config(), generation=None), ["09.png"])
    assert figures == {}


def test_noise_robustness_draws_each_method_s_psnr_and_ssim_against_sigma(figures):
    sigmas = [0.1, 0.3, 0.5]
    rows = [{"sigma": s, "method": m, "n_images": 40, "psnr": 10 * k + s, "ssim": k + s / 10}
            for k, m in enumerate(("noisy input", "TV (Chambolle)", "VAE")) for s in sigmas]
    results = types.SimpleNamespace(robustness=pd.DataFrame(rows), config=vf.Config(noise_factor=0.3))
    vf.draw_noise_robustness(results, ["13.png"])
    fig = figures["13.png"][0]
    for ax, column in zip(fig.axes, ("psnr", "ssim"), strict=True):
        *methods, trained = ax.get_lines()
        for k, line in enumerate(methods):
            assert list(line.get_xdata()) == sigmas
            assert list(line.get_ydata()) == pytest.approx([row[column] for row in rows[3 * k:3 * k + 3]])
        assert list(trained.get_xdata()) == [0.3, 0.3] and trained.get_linewidth() > 0  # a visible mark
        assert "40 test images" in ax.get_title() and ax.get_xlabel() == "noise sigma"
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["noisy input", "TV (Chambolle)", "VAE", "VAE trained at sigma 0.3"]
    assert fig.axes[1].get_legend() is None
    left, right = (ax.get_position() for ax in fig.axes)
    assert left.x1 < right.x0 and left.y0 == pytest.approx(right.y0)  # side by side
    assert fig.get_suptitle() == "Noise robustness: x_noisy = clip(x + sigma*N(0,1), 0, 1)"


def test_an_image_grid_is_one_mosaic_with_two_white_pixels_between_images_and_a_label_per_row_and_column(figures):
    images = np.arange(2 * 3 * 28 * 28, dtype=np.float32).reshape(2, 3, 28, 28, 1) / (2 * 3 * 28 * 28)
    vf.plot_images(images, "grid", "g.png", ["a", "b"], ["x", "y", "z"])
    fig = figures["g.png"][0]
    ax = fig.axes[0]
    mosaic = ax.get_images()[0].get_array()
    assert mosaic.shape == (2 * 30 - 2, 3 * 30 - 2)
    for r in range(2):
        for c in range(3):
            np.testing.assert_array_equal(mosaic[30 * r:30 * r + 28, 30 * c:30 * c + 28], images[r, c, :, :, 0])
    assert (mosaic[28:30, :] == 1).all() and (mosaic[:, 28:30] == 1).all() and (mosaic[:, 58:60] == 1).all()
    assert ax.get_images()[0].get_clim() == (0, 1)
    assert list(ax.get_xticks()) == [13.5, 43.5, 73.5] and list(ax.get_yticks()) == [13.5, 43.5]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["x", "y", "z"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    assert fig.get_suptitle() == "grid"
    assert tuple(fig.get_size_inches()) == pytest.approx((3 + 1.2, 2 + 0.8))  # an inch per image, and the labels'
    vf.plot_images(images, "bare", "h.png")
    assert tuple(figures["h.png"][0].get_size_inches()) == pytest.approx((3, 2 + 0.5))


def test_a_latent_scatter_names_only_the_classes_it_draws(figures):
    labels = np.array([0, 3, 3, 7])
    coords = np.arange(8.0).reshape(4, 2)
    vf.plot_latent_scatter(coords, labels, "t", "s.png", vf.CLASS_NAMES_TR, ("PC1", "PC2"))
    ax = figures["s.png"][0].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [vf.CLASS_NAMES_TR[c] for c in (0, 3, 7)]
    assert ax.get_legend().get_title().get_text() == "class"
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("t", "PC1", "PC2")
    # every point at its own (dim 1, dim 2), in the colour of its class; the legend beside the axes, not over them
    points = ax.collections[0]
    drawn = sorted(map(tuple, points.get_offsets()))
    assert drawn == sorted(map(tuple, coords))
    colours = {tuple(xy): tuple(colour) for xy, colour in zip(points.get_offsets(), points.get_facecolors())}
    assert colours[(2.0, 3.0)] == colours[(4.0, 5.0)] != colours[(0.0, 1.0)]  # class 3 twice, class 0
    renderer = figures["s.png"][0].canvas.get_renderer()
    legend, axes = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.x0 >= axes.x1 and axes.y0 <= legend.y0 and legend.y1 <= axes.y1
    vf.plot_latent_scatter(coords, labels, "t", "d.png")
    assert [t.get_text() for t in figures["d.png"][0].axes[0].get_legend().get_texts()] == ["0", "3", "7"]


def test_a_training_curve_draws_its_column_per_epoch(figures):
    history = pd.DataFrame({"epoch": [1, 2, 3], "kl_loss": [5.0, 4.0, 3.5]})
    vf.plot_training_curve(history, "kl_loss", "KL", "nats", "c.png")
    ax = figures["c.png"][0].axes[0]
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == [5.0, 4.0, 3.5]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("KL", "epoch", "nats")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["kl_loss"]


def test_the_title_cards_are_1536_by_864_pixels_with_the_original_s_titles(tmp_path):
    paths = [tmp_path / name for name, _title, _subtitle in vf.TITLE_PANELS]
    vf.draw_title_cards(None, paths)
    for path in paths:
        assert matplotlib.image.imread(path).shape[:2] == (864, 1536)
    fig = vf.plt.figure(figsize=(2, 1))
    vf.save_figure(fig, tmp_path / "small.png", tight=False)  # 120 dpi, the whole canvas
    assert matplotlib.image.imread(tmp_path / "small.png").shape[:2] == (120, 240)
    assert not vf.plt.fignum_exists(fig.number)  # closed once saved


def test_a_notebook_shows_the_saved_file(tmp_path, monkeypatch):
    display = pytest.importorskip("IPython.display")
    shown = []
    monkeypatch.setattr(display, "display", shown.append)
    vf.save_figure(vf.plt.figure(figsize=(2, 1)), tmp_path / "shown.png", show=True)
    vf.save_figure(vf.plt.figure(figsize=(2, 1)), tmp_path / "not-shown.png")
    assert len(shown) == 1 and shown[0].data == (tmp_path / "shown.png").read_bytes()


def test_the_title_cards_frame_the_original_s_titles(figures):
    vf.draw_title_cards(None, [name for name, _title, _subtitle in vf.TITLE_PANELS])
    for name, title, subtitle in vf.TITLE_PANELS:
        fig, tight = figures[name]
        assert not tight
        assert texts(fig) == [title, subtitle, "VAE on Fashion-MNIST"]
        (frame,) = fig.patches
        assert (frame.get_x(), frame.get_y(), frame.get_width(), frame.get_height()) == pytest.approx(
            (0.04, 0.06, 0.92, 0.88))
        # as drawn: the three lines centred on the card, top to bottom, apart, each inside the frame
        renderer = fig.canvas.get_renderer()
        inside = frame.get_window_extent(renderer)
        boxes = [text.get_window_extent(renderer) for text in fig.texts]
        for box in boxes:
            assert inside.x0 < box.x0 and box.x1 < inside.x1 and inside.y0 < box.y0 and box.y1 < inside.y1, name
            assert abs((box.x0 + box.x1) / 2 - fig.bbox.width / 2) < 1, name
        assert boxes[0].y0 > boxes[1].y1 and boxes[1].y0 > boxes[2].y1, name
        assert not frame.get_fill()  # a frame, not a panel over the card
    with pytest.raises(ValueError):  # a card for every file, and a file for every card
        vf.draw_title_cards(None, ["A.png", "B.png", "C.png"])


def test_the_sample_grids_name_their_density_and_the_class_of_each_row(figures):
    config = vf.Config(generator="expost", expost_components=80, prior="normal")
    grid = np.zeros((2, 3, 28, 28, 1), np.float32)
    results = types.SimpleNamespace(config=config, generated_grid=grid, conditional_grid=grid,
                                    conditional_classes=np.array([4, 9]))
    vf.draw_generated_samples(results, ["07.png"])
    assert figures["07.png"][0].get_suptitle() == (
        "Generated: decoder(z),\nz ~ a mixture of 80 full-covariance Gaussians fitted to the training z_mean after "
        "training")
    vf.draw_class_conditional(results, ["12.png"])
    ax = figures["12.png"][0].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"{vf.CLASS_NAMES_TR[c]}\n({vf.CLASS_NAMES_EN[c]})"
                                                           for c in (4, 9)]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3"]
