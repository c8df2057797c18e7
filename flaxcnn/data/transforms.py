"""Per-example and per-batch transforms, as picklable grain transforms (worker processes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from flaxcnn.data.dataset import DatasetInfo
from flaxcnn.data.imaging import LUMA_WEIGHTS, match_channels, resize_square

# The random augmentations of training images. "default" names the data set's own: random
# crops, plus horizontal flips where a mirror image keeps its label (DatasetInfo.hflip).
AUGMENTATIONS = ("none", "crop", "crop+flip")
DEFAULT_AUGMENT = "default"


def resolve_augment(augment: str, hflip: bool, small_split: bool = False) -> str:
    """The augmentation ``augment`` names, ``"default"`` resolved for a data set whose
    horizontal flips keep labels (``hflip``) or not (digits and other characters), and
    to ``"none"`` for a small training split (``small_split``: the trainer decides)."""
    if augment == DEFAULT_AUGMENT:
        if small_split:
            return "none"
        return "crop+flip" if hflip else "crop"
    if augment not in AUGMENTATIONS:
        choices = ", ".join((DEFAULT_AUGMENT, *AUGMENTATIONS))
        raise ValueError(f"unknown augmentation {augment!r}; choose from {choices}")
    return augment


def crop_padding(image_size: int) -> int:
    """Padding for random crops: 4 px at 32 px (the CIFAR recipe), in proportion otherwise."""
    return max(1, round(4 * image_size / 32))


def normalization(info: DatasetInfo, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The data set's mean/std carried over to the model's number of channels.

    Grayscale -> RGB repeats them. RGB -> grayscale takes the luma-weighted mean exactly and
    the luma-weighted std, an upper bound that is tight when the channels move together.
    """
    mean, std = np.asarray(info.mean, np.float64), np.asarray(info.std, np.float64)
    if mean.size == 1 and channels == 3:
        mean, std = np.repeat(mean, 3), np.repeat(std, 3)
    elif mean.size == 3 and channels == 1:
        mean, std = mean[None] @ LUMA_WEIGHTS, std[None] @ LUMA_WEIGHTS
    if mean.size != channels:
        raise ValueError(f"{info.name}: no normalisation for {channels} channels from {mean}")
    return mean.astype(np.float32), std.astype(np.float32)


class Preprocess(grain.transforms.Map):
    """Deterministic: square and resize to the model's input, then match its channels."""

    def __init__(self, image_size: int, channels: int):
        self.image_size = image_size
        self.channels = channels

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        image = resize_square(element["image"], self.image_size)
        return {**element, "image": match_channels(image, self.channels)}


def padded_crop(image: np.ndarray, shift_y: int, shift_x: int) -> np.ndarray:
    """The crop of the zero-padded image whose origin is ``(shift_y, shift_x)`` from the
    original's: ``out[y, x] = image[y + shift_y, x + shift_x]``, zero outside the image.

    One copy into a blank canvas, no padded intermediate: this runs once per example.
    """
    height, width = image.shape[:2]
    out = np.zeros_like(image)
    out[max(0, -shift_y) : height - max(0, shift_y), max(0, -shift_x) : width - max(0, shift_x)] = (
        image[max(0, shift_y) : height + min(0, shift_y), max(0, shift_x) : width + min(0, shift_x)]
    )
    return out


class Augment(grain.transforms.RandomMap):
    """Random crop from a zero-padded image, and a horizontal flip where it keeps the label."""

    def __init__(self, padding: int, hflip: bool):
        self.padding = padding
        self.hflip = hflip

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        span = 2 * self.padding + 1
        top, left, flip = rng.integers(0, (span, span, 2))
        image = element["image"]
        if self.hflip and flip:
            image = image[:, ::-1]
        image = padded_crop(image, int(top) - self.padding, int(left) - self.padding)
        return {**element, "image": image}


class Normalize(grain.transforms.Map):
    """Batch-level uint8 -> float32 ``(x / 255 - mean) / std``; labels to int32."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.scale = (1.0 / (255.0 * np.asarray(std, np.float32))).astype(np.float32)
        self.shift = (-np.asarray(mean, np.float32) / np.asarray(std, np.float32)).astype(
            np.float32
        )

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        image = batch["image"].astype(np.float32)
        image *= self.scale
        image += self.shift
        out = {**batch, "image": image, "label": batch["label"].astype(np.int32)}
        if "mask" in batch:
            out["mask"] = batch["mask"].astype(bool)
        return out
