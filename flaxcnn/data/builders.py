"""Glue between prepared TFDS builders and :class:`Dataset`, shared by every kind of data set."""

from __future__ import annotations

import contextlib
import functools
import io
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


def prepare_array_record(builder: tfds.core.DatasetBuilder, quiet: bool = False) -> None:
    """Prepare ``builder`` as array_record, never fetching TFDS's pre-built copies from GCS.

    ``quiet`` (local data: the digits, a folder) replaces tfds's progress bars and its
    "Downloading and preparing" banner, which would be wrong for offline data and take
    seconds at most, by one line on stderr.
    """
    prepare = functools.partial(
        builder.download_and_prepare,
        file_format=ARRAY_RECORD.value,
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
    if not quiet:
        prepare()
        return
    print(f"preparing {builder.name} once in {builder.data_dir}", file=sys.stderr)
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
    sources = builder.as_data_source(split=[TRAIN, test_split], decoders=decoders or None)
    train, test = (ImageLabelSource(s, image_key=image_key, label_key=label_key) for s in sources)
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
    )
    return Dataset(info=info, train=train, test=test)
