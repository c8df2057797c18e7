"""The embedded digits: prepared offline into a TFDS array_record data set, fixed split."""

import subprocess
import sys

import numpy as np
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from flaxcnn import data


def test_info_describes_the_digits(digits):
    info = digits.info
    assert info.name == "digits"
    assert info.num_classes == 10
    assert info.class_names == tuple("0123456789")
    assert info.image_shape == (8, 8, 1)
    assert (info.num_train, info.num_test) == (1437, 360)
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    assert info.hflip is False
    assert len(info.mean) == len(info.std) == 1
    assert 0.2 < info.mean[0] < 0.4 and 0.3 < info.std[0] < 0.45


def test_examples_are_uint8_images_scaled_from_16_grey_levels(digits):
    example = digits.train[0]
    assert example["image"].dtype == np.uint8 and example["image"].shape == (8, 8, 1)
    assert isinstance(example["label"], int)
    pixels = np.concatenate([digits.test[i]["image"].ravel() for i in range(len(digits.test))])
    levels = np.rint(np.arange(17) * 255 / 16).astype(np.uint8)
    assert set(np.unique(pixels)) <= set(levels) and pixels.max() == 255


def test_split_is_stratified_and_recorded_in_the_metadata(digits_data_dir, digits):
    builder = tfds.builder("digits", data_dir=digits_data_dir)
    split = builder.info.metadata["split"]
    test_indices = np.array(split["test_indices"])
    assert len(test_indices) == 360 and split["seed"] == 0
    sklearn = load_digits()
    # The recorded indices are the test split: same multiset of labels and images.
    test_labels = sorted(digits.test[i]["label"] for i in range(len(digits.test)))
    assert test_labels == sorted(sklearn.target[test_indices].tolist())
    per_class = np.bincount(sklearn.target[test_indices], minlength=10)
    expected = np.bincount(sklearn.target, minlength=10) * 0.2
    assert np.all(np.abs(per_class - expected) <= 1)


def test_tfds_reads_it_by_name_and_prepares_only_once(digits_data_dir):
    sources = tfds.data_source("digits", data_dir=digits_data_dir)
    assert len(sources["train"]) == 1437 and len(sources["test"]) == 360
    info_file = next(digits_data_dir.glob("digits/*/dataset_info.json"))
    before = info_file.stat().st_mtime_ns
    data.load("digits", data_dir=digits_data_dir)
    assert info_file.stat().st_mtime_ns == before


def test_default_data_dir_follows_tfds_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    assert data.default_data_dir() == tmp_path


def test_preparation_message_names_the_final_directory(tmp_path, capsys):
    data.load("digits", data_dir=tmp_path)
    (final,) = tmp_path.glob("digits/*/dataset_info.json")
    message = capsys.readouterr().err
    assert f"preparing digits once in {final.parent}\n" in message
    assert "incomplete" not in message


def test_skip_corrupt_is_ignored_for_the_digits(digits_data_dir):
    ds = data.load("digits", data_dir=digits_data_dir, skip_corrupt=True)
    assert ds.info.num_train == 1437


def test_reading_prints_no_opencv_warning(digits_data_dir):
    code = (
        "import logging, sys; from flaxcnn import data\n"
        "ds = data.load('digits', data_dir=sys.argv[1]); ds.train[0]; ds.test[0]\n"
        "logging.getLogger('absl').warning('other absl warnings still show')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(digits_data_dir)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OpenCV" not in result.stderr
    assert "other absl warnings still show" in result.stderr
