"""Validation splits: a data set's own (a folder's val/), or a fixed share held out of train."""

from __future__ import annotations

import numpy as np
import pytest

from flaxcnn import data
from flaxcnn.data.dataset import HOLD_OUT_SEED


def images(source) -> list[bytes]:
    """Each example's pixels and label, read in one batched call (as grain reads)."""
    examples = source.__getitems__(list(range(len(source))))
    return [x["image"].tobytes() + bytes([x["label"]]) for x in examples]


def test_a_held_out_share_leaves_training_and_is_the_same_every_time(digits_data_dir):
    digits = data.load("digits", data_dir=digits_data_dir)
    held = data.hold_out(digits, 0.1)
    info = held.info
    assert (info.num_train, info.num_val, info.num_test) == (1293, 144, 360)
    assert (len(held.train), len(held.val), len(held.test)) == (1293, 144, 360)
    assert info.val_source == "held out"
    # Every training image exactly once, in one part or the other; the test split untouched.
    assert sorted(images(held.train) + images(held.val)) == sorted(images(digits.train))
    assert held.test is digits.test
    # The same images whatever else happens (a fixed seed, not the run's --seed).
    again = data.hold_out(data.load("digits", data_dir=digits_data_dir), 0.1)
    assert images(again.val) == images(held.val)
    chosen = np.sort(np.random.default_rng(HOLD_OUT_SEED).permutation(1437)[:144])
    every = images(digits.train)
    assert images(held.val) == [every[i] for i in chosen]
    # Batched reads (grain's __getitems__) give what single reads give.
    assert [x["label"] for x in held.val.__getitems__([0, 5, 3])] == [
        held.val[i]["label"] for i in (0, 5, 3)
    ]
    assert data.hold_out(digits, 0.0) is digits  # 0: no validation split


def test_hold_out_refuses_to_leave_nothing_to_train_on(image_folder, tmp_path):
    folder = image_folder(per_class=4)  # 12 images: 9 train, 3 test
    ds = data.load(f"folder:{folder}", data_dir=tmp_path / "tfds")
    with pytest.raises(ValueError, match="leaves none to train on; lower --val-fraction"):
        data.hold_out(ds, 0.95)  # 9 of 9
    with pytest.raises(ValueError, match="below 1"):
        data.hold_out(ds, 1.0)


def test_a_folders_val_directory_is_its_validation_split(image_folder, write_image, tmp_path):
    folder = image_folder(per_class=4, test_per_class=2)
    rng = np.random.default_rng(1)
    for cls in ("cat", "dog", "owl"):
        for i in range(3):
            write_image(folder / "val" / cls / f"v{i}.png", rng, size=(24, 24), gray=True)
    ds = data.load(f"folder:{folder}", data_dir=tmp_path / "tfds")
    assert ds.info.class_names == ("cat", "dog", "owl")  # val/ is a split, not a class
    assert (ds.info.num_train, ds.info.num_val, ds.info.num_test) == (12, 9, 6)
    assert ds.info.val_source == "own"
    assert sorted(ds.val[i]["label"] for i in range(9)) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert data.hold_out(ds, 0.1) is ds  # its own split is kept


def test_a_val_directory_needs_the_training_classes(image_folder, write_image, tmp_path):
    folder = image_folder(per_class=4)
    write_image(folder / "val" / "cat" / "v.png", np.random.default_rng(1), size=(24, 24))
    with pytest.raises(ValueError, match=r"val/ must have the same class subdirectories"):
        data.load(f"folder:{folder}", data_dir=tmp_path / "tfds")
