"""Small splits decoded and resized once into memory, so epochs skip PNG/JPEG decoding.

Decoding (tfds parses the record, Pillow decodes the PNG/JPEG) and resizing are most of the
host's work per example; for a split whose preprocessed images fit in
:data:`MEMORY_LIMIT_BYTES` (digits, MNIST, CIFAR at their own sizes) doing them once per
pipeline makes every later epoch several times faster. Larger splits stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from flaxcnn.data.prefetch import read_ahead
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


def preprocess_in_memory(
    source: Sequence, image_size: int, channels: int, worker_count: int = 0
) -> InMemorySplit:
    """Read ``source`` once, in order, keeping its preprocessed images.

    The reading runs through grain like the training pipeline itself, so ``worker_count``
    processes share the decoding.
    """
    chunks = grain.MapDataset.source(source).map(Preprocess(image_size, channels))
    chunks = chunks.batch(_READ_CHUNK)
    images = np.empty((len(source), image_size, image_size, channels), np.uint8)
    labels = np.empty(len(source), np.int64)
    start = 0
    for chunk in read_ahead(chunks, worker_count):
        stop = start + len(chunk["label"])
        images[start:stop], labels[start:stop] = chunk["image"], chunk["label"]
        start = stop
    return InMemorySplit(images, labels)
