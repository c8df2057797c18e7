"""Small splits decoded and resized once into memory, so epochs skip PNG/JPEG decoding.

Decoding (tfds parses the record, Pillow decodes the PNG/JPEG) and resizing are most of the
host's work per example; for a split whose preprocessed images fit in
:data:`MEMORY_LIMIT_BYTES` (digits, MNIST, CIFAR at their own sizes) doing them once per
pipeline makes every later epoch several times faster. Larger splits stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from flaxcnn.data.transforms import Preprocess

MEMORY_LIMIT_BYTES = 1 << 30
_READ_CHUNK = 1024


class InMemorySplit(Sequence):
    """Preprocessed uint8 images [N, S, S, C] and labels [N], served like the source."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        return {"image": self.images[index], "label": int(self.labels[index])}


def fits_in_memory(num_examples: int, image_size: int, channels: int) -> bool:
    return num_examples * image_size * image_size * channels <= MEMORY_LIMIT_BYTES


def preprocess_in_memory(source: Sequence, image_size: int, channels: int) -> InMemorySplit:
    """Read ``source`` in order (batched reads) and keep its preprocessed images."""
    preprocess = Preprocess(image_size, channels)
    images = np.empty((len(source), image_size, image_size, channels), np.uint8)
    labels = np.empty(len(source), np.int64)
    read_many = getattr(source, "__getitems__", None) or (lambda keys: [source[k] for k in keys])
    for start in range(0, len(source), _READ_CHUNK):
        indices = list(range(start, min(start + _READ_CHUNK, len(source))))
        for index, example in zip(indices, read_many(indices), strict=True):
            images[index] = preprocess.map(example)["image"]
            labels[index] = example["label"]
    return InMemorySplit(images, labels)
