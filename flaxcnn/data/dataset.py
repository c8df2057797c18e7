"""What every loader returns: a frozen description plus random-access train/test sources.

Whatever stored the data (the embedded digits, a user's folder, a standard TFDS set), the
pipelines see the same thing: ``source[i] -> {"image": uint8 HxWxC, "label": int}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

TRAIN = "train"
VAL = "val"
TEST = "test"
# Where a TFDS set has no "test" split, its held-out split is called one of these.
TEST_SPLIT_ALIASES = ("test", "validation", "valid", "val")


class DatasetNotPrepared(ValueError):
    """A data set is not on disk in a readable form and cannot be prepared here.

    Its ``str`` is one line saying exactly how to prepare it.
    """


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the pipelines and the trainer need to know about a data set.

    ``image_shape`` is the stored (H, W, C); a dimension is 0 where the stored images vary in
    it (some TFDS sets such as imagenette): the pipelines resize every image anyway.
    ``mean``/``std`` are per stored channel on the 0..1 scale. ``hflip`` says whether a
    horizontal flip keeps the label (False for digits and other characters).
    ``fingerprint`` changes with any file of a folder data set (its name, and so its class,
    its size or its time); "" for other data sets. ``num_val`` is the size of the
    validation split (0: none); ``val_source`` says where it comes from: "" (none), "own"
    (the data set's own validation split) or "held out" (a share of the training split).
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    num_train: int
    num_test: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool
    fingerprint: str = ""
    num_val: int = 0
    val_source: str = ""

    @property
    def channels(self) -> int:
        return self.image_shape[2]


class ImageLabelSource(Sequence):
    """A TFDS data source reduced to ``{"image", "label"}``: other features are not decoded.

    Picklable (grain worker processes receive it) and random-access, with the batched
    ``__getitems__`` that grain uses when it reads several records at once.
    """

    def __init__(self, source: Any, *, image_key: str = "image", label_key: str = "label"):
        self._source = source
        self._image_key = image_key
        self._label_key = label_key

    def __len__(self) -> int:
        return len(self._source)

    def _convert(self, record: dict[str, Any]) -> dict[str, Any]:
        image = np.asarray(record[self._image_key], dtype=np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        return {"image": image, "label": int(record[self._label_key])}

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        return self._convert(self._source[index % len(self)])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self._convert(record) for record in self._source.__getitems__(list(indices))]

    def __repr__(self) -> str:
        return f"ImageLabelSource({self._source!r}, {len(self)} examples)"


class Subset(Sequence):
    """Some examples of a source, by index: the two parts of a training split that gives
    up a share to validation. Picklable, random-access, batched reads passed through."""

    def __init__(self, source: Sequence, indices: Sequence[int]):
        self._source = source
        self._indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        return self._source[int(self._indices[index])]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        picked = [int(self._indices[i]) for i in indices]
        if hasattr(self._source, "__getitems__"):
            return self._source.__getitems__(picked)
        return [self._source[i] for i in picked]

    def __repr__(self) -> str:
        return f"Subset({self._source!r}, {len(self)} examples)"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A loaded data set: its description and its splits (`val` None where it has none)."""

    info: DatasetInfo
    train: Sequence
    test: Sequence
    val: Sequence | None = None

    def split(self, name: str) -> Sequence:
        if name == TRAIN:
            return self.train
        if name == TEST:
            return self.test
        if name == VAL and self.val is not None:
            return self.val
        splits = "'train', 'val' or 'test'" if self.val is not None else "'train' or 'test'"
        raise ValueError(f"unknown split {name!r} of {self.info.name}; expected {splits}")


# The held-out validation images are the same for every --seed: runs of several seeds are
# then chosen on the same images, and only their training differs.
HOLD_OUT_SEED = 0


def hold_out(dataset: Dataset, fraction: float) -> Dataset:
    """The data set with a validation split: its own where it has one; else `fraction` of
    its training split, drawn at random (HOLD_OUT_SEED) and no longer trained on; else
    (`fraction` 0) none. At least one image is held out when `fraction` is positive."""
    if dataset.val is not None or fraction <= 0:
        return dataset
    if not fraction < 1:
        raise ValueError(f"the validation fraction must be below 1, got {fraction}")
    n = len(dataset.train)
    count = max(1, round(fraction * n))
    if count >= n:
        raise ValueError(
            f"{dataset.info.name}: holding out {count} of its {n} training images for "
            "validation leaves none to train on; lower --val-fraction or add images"
        )
    order = np.random.default_rng(HOLD_OUT_SEED).permutation(n)
    val, train = np.sort(order[:count]), np.sort(order[count:])
    info = dataclasses.replace(
        dataset.info, num_train=len(train), num_val=count, val_source="held out"
    )
    return Dataset(info, Subset(dataset.train, train), dataset.test, Subset(dataset.train, val))
