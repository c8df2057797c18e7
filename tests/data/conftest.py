"""Shared fixtures for the data tests: a prepared digits directory, synthetic data sets
whose images encode their own index, and generated image folders. Nothing is downloaded."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flaxcnn import data


@pytest.fixture(scope="session")
def digits(digits_data_dir) -> data.Dataset:
    return data.load("digits", data_dir=digits_data_dir)


class IndexedSplit(Sequence):
    """Example ``i`` is an 8x8x1 image whose first two pixels spell ``i`` (base 256)."""

    def __init__(self, size: int, num_classes: int, offset: int = 0):
        self._size, self._num_classes, self._offset = size, num_classes, offset

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index):
        if not 0 <= index < self._size:
            raise IndexError(index)
        ident = index + self._offset
        image = np.full((8, 8, 1), 100, np.uint8)
        image[0, 0, 0], image[0, 1, 0] = divmod(ident, 256)
        return {"image": image, "label": ident % self._num_classes}


def _example_ids(batch: dict[str, np.ndarray]) -> np.ndarray:
    pixels = np.rint(batch["image"][:, 0, :2, 0] * 255.0).astype(np.int64)
    return pixels[:, 0] * 256 + pixels[:, 1]


@pytest.fixture
def example_ids() -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """Recover the ids written by :class:`IndexedSplit` (mean 0, std 1, no augmentation)."""
    return _example_ids


@pytest.fixture
def indexed_dataset() -> Callable[..., data.Dataset]:
    def make(num_train: int, num_test: int, num_classes: int = 10, hflip: bool = False):
        info = data.DatasetInfo(
            name="indexed",
            num_classes=num_classes,
            class_names=tuple(str(c) for c in range(num_classes)),
            image_shape=(8, 8, 1),
            num_train=num_train,
            num_test=num_test,
            mean=(0.0,),
            std=(1.0,),
            hflip=hflip,
        )
        # Test ids start after the training ids, so the two can never be confused.
        train = IndexedSplit(num_train, num_classes)
        test = IndexedSplit(num_test, num_classes, offset=num_train)
        return data.Dataset(info=info, train=train, test=test)

    return make


def _write_image(path: Path, rng: np.random.Generator, *, size=(24, 24), gray=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0]) if gray else (size[1], size[0], 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


@pytest.fixture
def write_image() -> Callable[..., None]:
    """``write_image(path, rng, size=(w, h), gray=False)``: a random PNG/JPEG (by suffix)."""
    return _write_image


@pytest.fixture
def image_folder(tmp_path) -> Callable[..., Path]:
    """Build ``root/<class>/<n>.png|jpg``: PNGs grayscale, JPEGs RGB, sizes varying."""

    def make(
        classes: Sequence[str] = ("cat", "dog", "owl"),
        per_class: int = 5,
        *,
        name: str = "images",
        sizes: Sequence[tuple[int, int]] = ((24, 24), (30, 20), (20, 28)),
        test_per_class: int = 0,
    ) -> Path:
        root = tmp_path / name
        rng = np.random.default_rng(0)
        for split_root, count in ((root, per_class), (root / "test", test_per_class)):
            for cls in classes if count else ():
                for i in range(count):
                    size = sizes[i % len(sizes)]
                    suffix = ".png" if i % 2 == 0 else ".jpg"
                    _write_image(split_root / cls / f"{i}{suffix}", rng, size=size, gray=i % 2 == 0)
        return root

    return make
