"""Standard TFDS data sets by name (mnist, cifar10, imagenette, imagenet2012, ...).

Read through ``tfds`` data sources over array_record files, which needs no TensorFlow.
Preparing one (downloading and writing it) does need TensorFlow in tfds 4.9, and a network:
where both are present (Colab) an unprepared set is prepared as array_record on first use;
elsewhere :class:`DatasetNotPrepared` says in one line how to prepare it.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import socket
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from flaxcnn.data.builders import dataset_from_builder, is_array_record, prepare_array_record
from flaxcnn.data.dataset import TRAIN, Dataset, DatasetNotPrepared
from flaxcnn.data.imaging import ChannelStats
from flaxcnn.data.storage import exclusive_lock, resolve_data_dir

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# Per-channel (mean, std) on the 0..1 scale of the training splits, as commonly published.
KNOWN_STATISTICS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn_cropped": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "imagenet2012": _IMAGENET,
    "imagenette": _IMAGENET,
    "imagenet_resized": _IMAGENET,
}
# Digits and letters: a mirrored character is another character (or none at all).
NO_HFLIP = frozenset({"mnist", "mnist_corrupted", "emnist", "kmnist", "svhn_cropped"})
STATS_DIR = "flaxcnn_stats"
STATS_SAMPLE = 5000
NETWORK_PROBE = ("storage.googleapis.com", 443)


def tensorflow_installed() -> bool:
    """Whether TensorFlow could be imported, without importing it."""
    return importlib.util.find_spec("tensorflow") is not None


def network_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(NETWORK_PROBE, timeout=timeout):
            return True
    except OSError:
        return False


def base_name(name: str) -> str:
    """'imagenette/160px-v2:1.0.0' -> 'imagenette'."""
    return name.split("/")[0].split(":")[0]


def _builder(name: str, root: Path) -> tfds.core.DatasetBuilder:
    try:
        return tfds.builder(name, data_dir=os.fspath(root))
    except (ValueError, AssertionError) as error:  # Unknown names, configs or versions.
        base = base_name(name)
        # tfds prefixes 'Failed to construct dataset "x", builder_kwargs "{...}": '.
        reason = str(error).splitlines()[0].split('}": ')[-1].split(". Here are")[0].rstrip(". ")
        known = {*tfds.list_builders(with_community_datasets=False), "digits"}
        if base in known and base != "digits":  # A known set with a bad config or version.
            configs = ", ".join(tfds.builder_cls(base).builder_configs)
            reason = f"{reason}; {base}'s configs: {configs}" if configs else reason
        else:
            close = difflib.get_close_matches(base, sorted(known), n=3)
            reason += f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown data set {name!r} ({reason}); use 'digits', 'folder:PATH' or a TFDS "
            "image classification name such as mnist, cifar10, imagenette"
        ) from None


def _build_command(name: str, root: Path) -> str:
    return f"tfds build {name} --data_dir={root} --file_format=array_record"


def _prepare_or_explain(builder: tfds.core.DatasetBuilder, name: str, root: Path) -> None:
    """Prepare ``builder`` as array_record if this machine can; else DatasetNotPrepared."""
    command = _build_command(name, root)
    manual_dir = root / "downloads" / "manual"
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS and not any(manual_dir.glob("*")):
        raise DatasetNotPrepared(
            f"{name} is not prepared in {root} and needs a manual download: put the files "
            f"listed at https://www.tensorflow.org/datasets/catalog/{base_name(name)} into "
            f"{manual_dir}, then, with TensorFlow installed, run: {command}"
        )
    if not tensorflow_installed():
        raise DatasetNotPrepared(
            f"{name} is not prepared in {root}, and preparing it needs TensorFlow and a network "
            f"connection; where you have both, run: pip install tensorflow && {command}"
        )
    if not builder.MANUAL_DOWNLOAD_INSTRUCTIONS and not network_reachable():
        raise DatasetNotPrepared(
            f"{name} is not prepared in {root} and the network is unreachable; where it is "
            f"reachable, run: {command}"
        )
    with exclusive_lock(root / f".{base_name(name)}.lock", data_dir=root, what=name):
        builder = _builder(name, root)
        if builder.is_prepared():
            return
        try:
            prepare_array_record(builder)
        except Exception as error:  # Downloads fail in many ways; keep the message to one line.
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DatasetNotPrepared(
                f"preparing {name} in {root} failed ({reason}); retry with: {command}"
            ) from error


def _convert_or_explain(builder: tfds.core.DatasetBuilder, name: str) -> None:
    """Add array_record files to a set prepared only as tfrecord (needs TensorFlow)."""
    version_dir = builder.data_path
    command = (
        f"tfds convert_format --dataset_version_dir={version_dir} --out_file_format=array_record"
    )
    if not tensorflow_installed():
        raise DatasetNotPrepared(
            f"{name} is prepared in {version_dir} as {builder.info.file_format.value}, which "
            f"needs TensorFlow to read; convert it once where TensorFlow is installed: {command}"
        )
    from tensorflow_datasets.scripts.cli import convert_format_utils

    convert_format_utils.convert_dataset(
        out_dir=None,
        out_file_format=tfds.core.FileFormat.ARRAY_RECORD,
        dataset_version_dir=version_dir,
    )


def _statistics(builder: tfds.core.DatasetBuilder, root: Path, image_key: str):
    """Known constants, else measured once on (a sample of) the training split and cached."""
    base = base_name(builder.name)
    if base in KNOWN_STATISTICS:
        return KNOWN_STATISTICS[base]
    cache = root / STATS_DIR / f"{builder.info.full_name.replace('/', '__')}.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        return tuple(saved["mean"]), tuple(saved["std"])
    source = builder.as_data_source(split=TRAIN)
    indices = np.linspace(0, len(source) - 1, num=min(len(source), STATS_SAMPLE)).astype(int)
    stats: ChannelStats | None = None
    for index in np.unique(indices):
        image = np.asarray(source[int(index)][image_key])
        image = image[..., None] if image.ndim == 2 else image
        stats = stats or ChannelStats(image.shape[-1])
        stats.update(image)
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps({"mean": stats.mean, "std": stats.std, "sample": STATS_SAMPLE}))
    os.replace(partial, cache)
    return stats.mean, stats.std


def flips_keep_labels(name: str) -> bool:
    """Whether a horizontal flip keeps the labels of the TFDS set ``name``."""
    return base_name(name) not in NO_HFLIP


def load_tfds(name: str, *, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Open a standard TFDS image classification set by name, preparing it where possible."""
    root = resolve_data_dir(data_dir)
    builder = _builder(name, root)
    if not builder.is_prepared():
        _prepare_or_explain(builder, name, root)
        builder = _builder(name, root)
    if not is_array_record(builder):
        _convert_or_explain(builder, name)
        builder = _builder(name, root)
    image_key = builder.info.supervised_keys[0] if builder.info.supervised_keys else "image"
    mean, std = _statistics(builder, root, image_key)
    return dataset_from_builder(
        builder, name=name, mean=mean, std=std, hflip=flips_keep_labels(name)
    )
