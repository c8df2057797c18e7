"""Resizing, channel conversion, normalisation and augmentation: shapes and value ranges."""

import numpy as np
import pytest

from flaxcnn import data
from flaxcnn.data.imaging import match_channels, resize_square
from flaxcnn.data.transforms import Augment, crop_padding, normalization


def test_crop_padding_is_4_at_32_pixels_and_scales_with_size():
    assert [crop_padding(s) for s in (8, 32, 64, 224)] == [1, 4, 8, 28]


def test_resize_square_centre_crops_before_resizing():
    image = np.zeros((40, 20, 3), np.uint8)
    image[10:30] = 255  # The centred 20x20 square is all white.
    out = resize_square(image, 10)
    assert out.shape == (10, 10, 3) and out.min() == 255
    assert resize_square(np.zeros((8, 8, 1), np.uint8), 32).shape == (32, 32, 1)


def test_channel_conversion():
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
    rgb = match_channels(gray, 3)
    assert rgb.shape == (4, 4, 3) and (rgb == gray).all()
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 255
    assert (match_channels(red, 1) == 76).all()  # 0.299 * 255


@pytest.mark.parametrize("hflip", [False, True])
def test_augment_is_a_padded_crop_and_flips_only_when_allowed(hflip):
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, (8, 8, 1), dtype=np.uint8)
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)))
    crops = [padded[y : y + 8, x : x + 8] for y in range(3) for x in range(3)]
    augment = Augment(padding=1, hflip=hflip)
    flipped = 0
    for _ in range(200):
        out = augment.random_map({"image": image, "label": 3}, rng)["image"]
        assert out.shape == image.shape and out.dtype == np.uint8
        plain = any(np.array_equal(out, c) for c in crops)
        mirrored = any(np.array_equal(out, c[:, ::-1]) for c in crops)
        assert plain or mirrored
        flipped += not plain
    assert (flipped > 50) if hflip else (flipped == 0)


def test_augmented_digits_stay_in_the_normalised_range(digits):
    pipe = data.TrainPipeline(
        digits,
        global_batch_size=128,
        image_size=32,
        channels=3,
        seed=0,
        process_index=0,
        process_count=1,
    )
    batch = next(iter(pipe))
    mean, std = normalization(digits.info, 3)
    low, high = (0 - mean) / std, (1 - mean) / std
    assert batch["image"].shape == (128, 32, 32, 3)
    assert (batch["image"] >= low - 1e-5).all() and (batch["image"] <= high + 1e-5).all()
    assert np.isclose(batch["image"].min(), low[0])  # Padding shows up as black.
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])  # gray -> RGB


def test_rgb_folder_for_a_grayscale_model(image_folder, tmp_path):
    ds = data.load(f"folder:{image_folder(per_class=5)}", data_dir=tmp_path / "tfds")
    pipe = data.TrainPipeline(
        ds, global_batch_size=4, image_size=28, channels=1, seed=0, process_index=0, process_count=1
    )
    assert next(iter(pipe))["image"].shape == (4, 28, 28, 1)
    mean, std = normalization(ds.info, 1)
    assert mean.shape == std.shape == (1,) and 0 < mean[0] < 1
