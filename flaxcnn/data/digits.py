"""The embedded default: scikit-learn's 1,797 real 8x8 handwritten digits as a TFDS data set.

The digits ship inside scikit-learn, so this works offline. :class:`Digits` is an ordinary
``tfds.core.GeneratorBasedBuilder`` writing array_record files that ``tfds.builder("digits")``
and ``tfds.data_source("digits")`` read once ``flaxcnn.data`` is imported. One thing in tfds
4.9 needs TensorFlow on this path: its ``Image`` feature encodes numpy arrays with
``tf.image.encode_png``. Handed ready-made PNG bytes it stores them as they are, so the
builder encodes with Pillow and the whole preparation runs without TensorFlow.

The 16 grey levels (0..16) become uint8 (0..255); the split is a fixed stratified 80/20 one
(scikit-learn, seed 0) whose test indices are recorded in the data set's metadata, next to
the training split's mean and std.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from flaxcnn.data.builders import dataset_from_builder, prepare_array_record
from flaxcnn.data.dataset import Dataset
from flaxcnn.data.imaging import ChannelStats, encode_png
from flaxcnn.data.storage import (
    check_writable,
    exclusive_lock,
    resolve_data_dir,
    write_failed,
)

NAME = "digits"
TEST_FRACTION = 0.2
SPLIT_SEED = 0
HFLIP = False  # a mirrored digit is another digit, or none


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 (N, 8, 8, 1) images and int labels."""
    from sklearn.datasets import load_digits  # 2 s of imports: only when preparing the set

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, bunch.target.astype(np.int64)


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified train/test split, as sorted indices into the scikit-learn set."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(
        np.arange(len(labels)),
        test_size=TEST_FRACTION,
        stratify=labels,
        random_state=SPLIT_SEED,
    )
    return np.sort(train), np.sort(test)


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's optical-recognition handwritten digits (UCI), 8x8 grey, 10 classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Stratified 80/20 split (seed 0), PNG-encoded uint8 images."
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="1,797 8x8 handwritten digits from scikit-learn (UCI ML repository).",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Nothing to download: the data ship with scikit-learn.
        images, labels = digit_images()
        train, test = split_indices(labels)
        stats = ChannelStats(channels=1)
        stats.update(images[train])
        self.info.metadata.update(
            mean=stats.mean,
            std=stats.std,
            hflip=HFLIP,
            split={
                "method": "sklearn.model_selection.train_test_split, stratified",
                "test_fraction": TEST_FRACTION,
                "seed": SPLIT_SEED,
                "test_indices": test.tolist(),
            },
        )
        return {
            "train": self._generate_examples(images, labels, train),
            "test": self._generate_examples(images, labels, test),
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray):
        for index in indices:
            yield int(index), {"image": encode_png(images[index]), "label": int(labels[index])}


def load_digits(data_dir: str | os.PathLike | None = None) -> Dataset:
    """Open the digits, preparing them first (once, offline) if the data directory lacks them."""
    root = resolve_data_dir(data_dir)
    builder = Digits(data_dir=os.fspath(root))
    if not builder.is_prepared():
        # tfds writes under <root>/digits and keeps downloads/ (empty here) in root itself.
        check_writable(root, [Path(builder.data_path).parent], NAME)
        with exclusive_lock(root / f".{NAME}.lock", data_dir=root, what=NAME):
            builder = Digits(data_dir=os.fspath(root))
            if not builder.is_prepared():
                # tfds writes into an "incomplete" directory and renames it when done, so an
                # interrupted preparation never looks prepared.
                try:
                    prepare_array_record(builder, quiet=True)
                except OSError as error:  # A full disk, say: one line, like bad input.
                    raise write_failed(root, NAME, error) from None
    metadata = builder.info.metadata
    return dataset_from_builder(
        builder, name=NAME, mean=metadata["mean"], std=metadata["std"], hflip=metadata["hflip"]
    )
