"""Glue between prepared TFDS builders and :class:`Dataset`, shared by every kind of data set."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import sys
from collections.abc import Sequence

import tensorflow_datasets as tfds

from flaxcnn.data.dataset import (
    TEST_SPLIT_ALIASES,
    TRAIN,
    Dataset,
    DatasetInfo,
    ImageLabelSource,
)

ARRAY_RECORD = tfds.core.FileFormat.ARRAY_RECORD
VALIDATION = "validation"  # TFDS's name for a validation split
OPENCV_WARNING = "OpenCV is not installed"
MISSING_VARIANT_WARNING = "Variant folder %s has no"


class _NoOpenCVWarning(logging.Filter):
    """Drops tfds's advice to install OpenCV, logged (through absl) on the first image decoded.

    Pillow decodes our small PNGs well enough, and the warning would otherwise reach every
    user of evaluate and train; other absl warnings still pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(OPENCV_WARNING)


class _NoMissingVariantWarning(logging.Filter):
    """Drops tfds's warning that a version folder has no dataset_info.json, when there is no
    such folder at all: tfds logs it on opening any set not prepared yet (twice for the
    digits), while flaxcnn then prepares the set or says in one line why it cannot."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            str(record.msg).startswith(MISSING_VARIANT_WARNING)
            and isinstance(record.args, tuple)
            and record.args
            and not os.path.isdir(record.args[0])
        )


for _filter in (_NoOpenCVWarning, _NoMissingVariantWarning):
    if not any(isinstance(f, _filter) for f in logging.getLogger("absl").filters):
        logging.getLogger("absl").addFilter(_filter())


def prepare_array_record(
    builder: tfds.core.DatasetBuilder, quiet: bool = False, shown_dir: str | os.PathLike = ""
) -> None:
    """Prepare ``builder`` as array_record, never fetching TFDS's pre-built copies from GCS.

    ``quiet`` (local data: the digits, a folder) replaces tfds's progress bars and its
    "Downloading and preparing" banner, which would be wrong for offline data and take
    seconds at most, by one line on stderr. That line names ``shown_dir``, the final
    location, when the builder writes into a staging directory renamed into place afterwards.
    """
    prepare = functools.partial(
        builder.download_and_prepare,
        file_format=ARRAY_RECORD.value,
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
    if not quiet:
        prepare()
        return
    print(f"preparing {builder.name} once in {shown_dir or builder.data_dir}", file=sys.stderr)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        prepare()


def is_array_record(builder: tfds.core.DatasetBuilder) -> bool:
    info = builder.info
    return info.file_format == ARRAY_RECORD or ARRAY_RECORD in (info.alternative_file_formats or ())


def image_label_keys(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
    """The (image, label) feature names of an image classification set, or ValueError."""
    keys = builder.info.supervised_keys
    features = builder.info.features
    if (
        isinstance(keys, tuple)
        and len(keys) == 2
        and all(isinstance(key, str) for key in keys)
        and isinstance(features[keys[0]], tfds.features.Image)
        and isinstance(features[keys[1]], tfds.features.ClassLabel)
    ):
        return keys
    raise ValueError(
        f"{builder.info.full_name} is not an image classification data set "
        f"(supervised keys {keys!r}); flaxcnn needs (image, class label) pairs"
    )


def test_split_name(splits: Sequence[str], dataset: str) -> str:
    for name in TEST_SPLIT_ALIASES:
        if name in splits:
            return name
    raise ValueError(f"{dataset} has no test or validation split (splits: {sorted(splits)})")


def dataset_from_builder(
    builder: tfds.core.DatasetBuilder,
    *,
    name: str,
    mean: Sequence[float],
    std: Sequence[float],
    hflip: bool,
) -> Dataset:
    """Open a prepared array_record builder through ``tfds``'s data sources (no TensorFlow)."""
    image_key, label_key = image_label_keys(builder)
    splits = builder.info.splits
    test_split = test_split_name(list(splits.keys()), name)
    # Only decode the two features we use: other features (ids, file names) cost time.
    decoders = {
        key: tfds.decode.SkipDecoding()
        for key in builder.info.features
        if key not in (image_key, label_key)
    }
    # A set with both a test and a validation split keeps the validation split for choosing
    # checkpoints (where "validation" is its only held-out split, it serves as the test).
    val_split = VALIDATION if test_split != VALIDATION and VALIDATION in splits else None
    names = [TRAIN, test_split] + ([val_split] if val_split else [])
    sources = builder.as_data_source(split=names, decoders=decoders or None)
    train, test, *val = (
        ImageLabelSource(s, image_key=image_key, label_key=label_key) for s in sources
    )
    label_feature = builder.info.features[label_key]
    height, width, channels = builder.info.features[image_key].shape
    info = DatasetInfo(
        name=name,
        num_classes=label_feature.num_classes,
        class_names=tuple(label_feature.names),
        image_shape=(height or 0, width or 0, channels or 0),
        num_train=len(train),
        num_test=len(test),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        hflip=bool(hflip),
        num_val=len(val[0]) if val else 0,
        val_source="own" if val else "",
    )
    return Dataset(info=info, train=train, test=test, val=val[0] if val else None)
