"""IDX / CSV loading, dataset search order, preprocessing and noise."""

import gzip
import struct

import numpy as np
import pandas as pd
import pytest

import vae_fashion as vf
from conftest import IDX_NAMES, idx_bytes, synthetic_split, write_dataset, write_idx


def test_parse_idx_round_trip_images_and_labels():
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    labels = np.array([3, 9], dtype=np.uint8)
    np.testing.assert_array_equal(vf.parse_idx(idx_bytes(images), expected_ndim=3), images)
    np.testing.assert_array_equal(vf.parse_idx(idx_bytes(labels), expected_ndim=1), labels)
    four = np.arange(24, dtype=np.uint8).reshape(1, 2, 3, 4)  # the most dimensions IDX has
    np.testing.assert_array_equal(vf.parse_idx(idx_bytes(four)), four)
    with pytest.raises(vf.DatasetError, match=r"f: .* says 1 dimension\(s\), but images \(idx3\) were expected"):
        vf.parse_idx(idx_bytes(labels), "f", expected_ndim=3)


def test_read_idx_reads_raw_and_gzip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    raw = write_idx(tmp_path / "a-idx3-ubyte", images)
    gz = write_idx(tmp_path / "b-idx3-ubyte", images, gz=True)
    assert gz.suffix == ".gz"
    np.testing.assert_array_equal(vf.read_idx(raw), images)
    np.testing.assert_array_equal(vf.read_idx(gz), images)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "only 0 bytes"),
        (b"\x00\x00\x08", "only 3 bytes"),
        (b"\x00\x00\x08\x01", r"truncated header \(4 bytes, need 8\)"),  # the magic number alone
        (b"\x00\x00\x08\x00" + b"\x00" * 4, "bad magic number 0x00000800 \\(expected"),  # 0 dimensions
        (b"\x00\x00\x08\x05" + b"\x00" * 24, "bad magic number 0x00000805 \\(expected"),  # 5 dimensions
        (b"\x00\x00\x0d\x03" + b"\x00" * 12, "bad magic number 0x00000d03 \\(expected"),
        (b"\x01\x00\x08\x01" + b"\x00" * 4, "bad magic number"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated header"),
    ],
)
def test_parse_idx_rejects_bad_headers(data, message):
    with pytest.raises(vf.DatasetError, match=message):
        vf.parse_idx(data, "f")


def test_parse_idx_rejects_truncated_and_trailing_bytes():
    data = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(vf.DatasetError, match="f: truncated: .* implies 2368"):
        vf.parse_idx(data[:-1], "f")
    with pytest.raises(vf.DatasetError, match="f: has trailing bytes"):
        vf.parse_idx(data + b"\x00", "f")


def test_parse_idx_rejects_images_file_given_as_labels():
    images = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(vf.DatasetError, match="3 dimension.*labels \\(idx1\\) were expected"):
        vf.parse_idx(images, "labels-file", expected_ndim=1)


def test_parse_idx_forged_huge_header_does_not_allocate():
    forged = b"\x00\x00\x08\x03" + (0xFFFFFFFF).to_bytes(4, "big") * 3
    with pytest.raises(vf.DatasetError, match="truncated"):
        vf.parse_idx(forged + b"\x00" * 10, "forged")


def test_read_idx_corrupt_gzip_is_reported(tmp_path):
    path = tmp_path / "x-idx1-ubyte.gz"
    good = gzip.compress(idx_bytes(np.zeros(100, np.uint8)))
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(vf.DatasetError, match=f"{path}: cannot be read"):
        vf.read_idx(path)


def test_load_idx_folder_checks_shapes_counts_and_labels(tmp_path):
    folder = write_dataset(tmp_path / "ok", n_train=30, n_test=20)
    x_train, y_train, x_test, y_test = vf.load_idx_folder(str(folder))  # a folder given as text, too
    assert x_train.shape == (30, 28, 28) and y_train.dtype == np.int32 and len(y_test) == 20

    # images that are not 28x28
    write_idx(folder / IDX_NAMES["test_images"], np.zeros((20, 32, 32), np.uint8))
    with pytest.raises(vf.DatasetError, match="t10k-images-idx3-ubyte: images are \\(32, 32\\)"):
        vf.load_idx_folder(folder)

    # label count differs from image count
    folder = write_dataset(tmp_path / "count", n_train=30, n_test=20)
    write_idx(folder / IDX_NAMES["train_labels"], np.zeros(29, np.uint8))
    with pytest.raises(vf.DatasetError, match="holds 29 labels but .* holds 30 images"):
        vf.load_idx_folder(folder)

    # a label outside 0-9
    folder = write_dataset(tmp_path / "range", n_train=30, n_test=20)
    labels = np.zeros(20, np.uint8)
    labels[7] = 12
    write_idx(folder / IDX_NAMES["test_labels"], labels)
    with pytest.raises(vf.DatasetError, match="label 12 at index 7 is outside 0-9"):
        vf.load_idx_folder(folder)


def test_missing_file_is_named(tmp_path):
    folder = write_dataset(tmp_path / "d", n_train=20, n_test=20)
    (folder / IDX_NAMES["train_labels"]).unlink()
    with pytest.raises(vf.DatasetError, match="missing train-labels-idx1-ubyte"):
        vf.find_and_load_raw(str(folder))


def test_missing_data_dir_names_the_variable(tmp_path):
    with pytest.raises(vf.DatasetError, match="VAE_DATA_DIR=.*is not a folder"):
        vf.find_and_load_raw(str(tmp_path / "nope"))


def test_idx_files_may_sit_in_same_named_subfolders(tmp_path):
    # Some Kaggle uploads unpack each file into a folder of the same name.
    folder = tmp_path / "kaggle"
    x, y = synthetic_split(20, 0)
    for key, array in (("train_images", x), ("train_labels", y), ("test_images", x), ("test_labels", y)):
        (folder / IDX_NAMES[key]).mkdir(parents=True)
        write_idx(folder / IDX_NAMES[key] / IDX_NAMES[key], array)
    (x_train, *_rest), source = vf.find_and_load_raw(str(folder))
    np.testing.assert_array_equal(x_train, x)
    assert "IDX files" in source


def _write_csvs(folder, n=12):
    folder.mkdir(parents=True, exist_ok=True)
    for split, seed in (("train", 0), ("test", 1)):
        x, y = synthetic_split(n, seed)
        frame = pd.DataFrame(x.reshape(n, -1), columns=[f"pixel{i + 1}" for i in range(784)])
        frame.insert(0, "label", y)
        frame.to_csv(folder / vf.CSV_FILES[split], index=False)
    return folder


def test_csv_only_folder_is_read(tmp_path):
    folder = _write_csvs(tmp_path / "csv")
    (x_train, y_train, x_test, y_test), source = vf.find_and_load_raw(str(folder))
    expected_x, expected_y = synthetic_split(12, 0)
    np.testing.assert_array_equal(x_train, expected_x)
    np.testing.assert_array_equal(y_train, expected_y)
    assert "CSV" in source and x_test.shape == (12, 28, 28)
    x_test_again, _y = vf.read_fashion_csv(str(folder / vf.CSV_FILES["test"]))  # a path given as text
    np.testing.assert_array_equal(x_test_again, x_test)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda text: text.replace(",", ";"), "1 columns"),
        (lambda text: text.rsplit("\n", 2)[0] + "\n1,2,3\n", "non-integer or empty cells"),
        (lambda text: text.replace("\n3,", "\n13,", 1), "csv \\(first column\\): label 13 at index \\d+ is outside"),
        (lambda text: text + "0," + ",".join(["300"] * 784) + "\n", "train.csv: pixel values outside 0-255"),
        (lambda text: "", "not a readable CSV"),
        (lambda text: text.split("\n", 1)[0] + "\n", "has 0 rows x 785 columns"),  # the header alone
    ],
)
def test_malformed_csv_is_reported(tmp_path, mutate, message):
    folder = _write_csvs(tmp_path / "csv")
    path = folder / vf.CSV_FILES["train"]
    path.write_text(mutate(path.read_text()))
    with pytest.raises(vf.DatasetError, match=message) as info:
        vf.find_and_load_raw(str(folder))
    assert "fashion-mnist_train.csv" in str(info.value)


def test_search_order_uses_first_complete_folder(tmp_path):
    partial = write_dataset(tmp_path / "partial", 20, 20)
    (partial / IDX_NAMES["test_images"]).unlink()
    first = write_dataset(tmp_path / "first", 30, 20)
    second = write_dataset(tmp_path / "second", 40, 20)
    raw, source = vf.find_and_load_raw(search_dirs=[tmp_path / "absent", partial, first, second], download=None)
    assert len(raw[0]) == 30 and str(first) in source


def test_nothing_found_lists_every_place_and_the_three_fixes(tmp_path):
    partial = write_dataset(tmp_path / "partial", 20, 20)
    (partial / IDX_NAMES["test_images"]).unlink()

    def offline():
        raise OSError("no network")

    with pytest.raises(vf.DatasetError) as info:
        vf.find_and_load_raw(search_dirs=[tmp_path / "absent", partial], download=offline)
    message = str(info.value)
    assert str(tmp_path / "absent") in message
    assert f"{partial} (incomplete: only " in message
    assert "load_data() (failed: OSError)" in message
    for fix in ("Add data", "apt-get install dataset-fashion-mnist", "go online"):
        assert fix in message


def test_the_keras_download_is_the_last_resort_and_is_checked_like_the_files(tmp_path):
    """Keras' download (offline here) stands in as a function returning its four arrays."""
    (x_train, y_train), (x_test, y_test) = synthetic_split(30, 1), synthetic_split(20, 2)
    raw, source = vf.find_and_load_raw(search_dirs=[tmp_path / "absent"],
                                       download=lambda: ((x_train, y_train), (x_test, y_test)))
    assert source == "keras download"
    for loaded, expected, dtype in zip(raw, (x_train, y_train, x_test, y_test), ("uint8", "int32") * 2):
        assert loaded.dtype == dtype and np.array_equal(loaded, expected)
    y_train[0] = 11  # each array named as what it is: the training labels, here
    with pytest.raises(vf.DatasetError, match=r"fashion_mnist train labels: label 11 at index 0 "):
        vf.find_and_load_raw(search_dirs=[], download=lambda: ((x_train, y_train), (x_test, y_test)))
    y_train[0] = 0
    y_test[3], y_test[7] = 10, 12  # the first is named, and how many there are
    with pytest.raises(vf.DatasetError, match=r"fashion_mnist test labels: label 10 at index 3 .*\(2 such labels\)"):
        vf.find_and_load_raw(search_dirs=[], download=lambda: ((x_train, y_train), (x_test, y_test)))


def test_default_search_order_starts_with_kaggle_and_ends_with_keras_cache():
    folders = vf.candidate_data_dirs()
    assert folders[0] == vf.KAGGLE_INPUT / "fashionmnist"
    assert folders[-2:] == [vf.DEBIAN_DATA_DIR, vf.KERAS_CACHE_DIR.expanduser()]


def test_the_default_kaggle_folder_comes_first_and_once_then_the_other_kaggle_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(vf, "KAGGLE_INPUT", tmp_path)
    first, other = write_dataset(tmp_path / "fashionmnist", 20, 20), write_dataset(tmp_path / "copy", 20, 20)
    assert vf.candidate_data_dirs() == [first, other, vf.DEBIAN_DATA_DIR, vf.KERAS_CACHE_DIR.expanduser()]


def test_a_split_holds_pixels_0_to_255_and_labels_0_to_9_from_any_array_like():
    """validated_split: both ends of each range pass, one beyond either end is refused; lists are arrays too.
    take_first: exactly as many images as there are is allowed."""
    images = np.zeros((2, 28, 28), np.int64)
    images[1, 5, 5] = 255
    x, y = vf.validated_split(images.tolist(), [0, 9], "img", "lab")
    assert x.dtype == np.uint8 and x.max() == 255 and y.tolist() == [0, 9]
    for value in (-1, 256):
        bad = images.copy()
        bad[1, 0, 0] = value
        with pytest.raises(vf.DatasetError, match="img: pixel values outside 0-255"):
            vf.validated_split(bad, [0, 9], "img", "lab")
    for label in (-1, 10):
        with pytest.raises(vf.DatasetError, match=f"lab: label {label} at index 1 "):
            vf.validated_split(images, [0, label], "img", "lab")
    assert len(vf.take_first(np.arange(5), 5, "VAE_TEST_SAMPLES")) == 5


def test_kaggle_walk_finds_nested_dataset(tmp_path):
    nested = write_dataset(tmp_path / "datasets" / "owner" / "slug", 20, 20, gz=True)
    _write_csvs(tmp_path / "other" / "csv-only")
    found = list(vf._kaggle_folders(tmp_path))
    assert nested in found and tmp_path / "other" / "csv-only" in found
    for name in ("q", "c", "x", "a", "m"):  # found in sorted order, whatever order the folders were made in
        write_dataset(tmp_path / "sorted" / name, 20, 20)
    assert [f.name for f in vf._kaggle_folders(tmp_path / "sorted")] == ["a", "c", "m", "q", "x"]
    five = write_dataset(tmp_path / "1" / "2" / "3" / "4" / "5", 20, 20)  # the deepest level searched
    six = write_dataset(five / "6", 20, 20)
    found = list(vf._kaggle_folders(tmp_path))
    assert five in found and six not in found


def test_load_fashion_mnist_preprocesses_and_takes_first_n(dataset_dir):
    config = vf.Config(data_dir=str(dataset_dir), train_samples=100, test_samples=50)
    data = vf.load_fashion_mnist(config)
    raw_x, raw_y = synthetic_split(600, 0)
    assert data.x_train.shape == (100, 28, 28, 1) and data.x_train.dtype == np.float32
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    np.testing.assert_allclose(data.x_train[..., 0] * 255.0, raw_x[:100], atol=1e-4)
    np.testing.assert_array_equal(data.y_train, raw_y[:100])
    assert data.x_test.shape == (50, 28, 28, 1)
    raw_x_test, raw_y_test = synthetic_split(200, 1)  # the first 50 test images, with their own labels
    np.testing.assert_allclose(data.x_test[..., 0] * 255.0, raw_x_test[:50], atol=1e-4)
    np.testing.assert_array_equal(data.y_test, raw_y_test[:50])


def test_sample_count_larger_than_dataset_names_the_variable(dataset_dir):
    with pytest.raises(vf.ConfigError, match="VAE_TRAIN_SAMPLES=601 is larger than the 600"):
        vf.load_fashion_mnist(vf.Config(data_dir=str(dataset_dir), train_samples=601))


def test_noise_formula_and_seeding():
    x = np.random.default_rng(3).random((50, 28, 28, 1), dtype=np.float32)
    noisy = vf.add_noise(x, 0.45, seed=7)
    expected = np.clip(x + 0.45 * np.random.default_rng(7).standard_normal(x.shape, dtype=np.float32), 0, 1)
    np.testing.assert_allclose(noisy, expected, rtol=0, atol=1e-6)
    assert noisy.dtype == np.float32 and noisy.min() >= 0 and noisy.max() <= 1
    np.testing.assert_array_equal(noisy, vf.add_noise(x, 0.45, seed=7))
    assert not np.array_equal(noisy, vf.add_noise(x, 0.45, seed=8))
    # far from the clip bounds the noise has the requested spread
    grey = np.full((200, 28, 28, 1), 0.5, np.float32)
    assert abs(np.std(vf.add_noise(grey, 0.05, seed=1) - grey) - 0.05) < 0.002


def test_parse_idx_rejects_an_empty_array_with_huge_dimensions():
    # found by the fuzzer: a zero dimension next to huge ones passes the length check
    data = struct.pack(">HBB", 0, 8, 4) + struct.pack(">4I", 0, 9407, 1547151, 633732355)
    with pytest.raises(vf.DatasetError, match="describes an empty array"):
        vf.parse_idx(data, "f")


def _epoch_batches(config, noisy, clean, labels, epochs):
    """{epoch: {image index: the noisy image it trained on}} over `epochs` epochs of make_train_dataset."""
    seen, steps = {}, vf.batches_per_epoch(len(clean), config)
    batches = iter(vf.make_train_dataset(noisy, clean, labels, config, 0, epochs))
    for epoch in range(epochs):
        seen[epoch] = {}
        for _ in range(steps):
            batch = next(batches)
            for image, label in zip(batch["noisy"].numpy(), batch["label"].numpy()):
                seen[epoch][int(label)] = image  # labels are the image indices here
    return seen


@pytest.mark.parametrize("fresh_noise", [True, False])
def test_fresh_noise_draws_new_noise_every_epoch_and_fixed_noise_reuses_one_copy(fresh_noise):
    """fresh_noise=1: every epoch a new noisy version of each image, noise_factor-sized around the clean image;
    0: the one fixed noisy copy, every epoch. Every image is seen once per epoch, in an order new each epoch."""
    config = vf.Config(batch_size=16, fresh_noise=fresh_noise, seed=4)
    clean = np.random.default_rng(0).random((40, 28, 28, 1), dtype=np.float32) * 0.5 + 0.25
    labels = np.arange(40, dtype=np.int32)  # each image's own index, to follow it through the batches
    fixed = vf.add_noise(clean, config.noise_factor, 99)
    seen = _epoch_batches(config, fixed, clean, labels, epochs=3)
    assert all(sorted(seen[e]) == list(range(40)) for e in seen)
    for i in (0, 17, 39):
        versions = [seen[e][i] for e in seen]
        if fresh_noise:
            assert not np.array_equal(versions[0], versions[1]) and not np.array_equal(versions[1], versions[2])
            assert not np.array_equal(versions[0], fixed[i])
            # the same law as the fixed copy's clip(x + 0.45 N(0, 1), 0, 1), a new draw
            assert abs(np.std(versions[0] - clean[i]) - np.std(fixed[i] - clean[i])) < 0.03
        else:
            for version in versions:
                np.testing.assert_array_equal(version, fixed[i])
    orders = [list(vf.make_train_dataset(fixed, clean, labels, config, e, e + 1).take(1))[0]["label"].numpy()
              for e in range(2)]
    assert not np.array_equal(orders[0], orders[1])
