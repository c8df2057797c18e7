"""``load(name)``: one entry point for the digits, image folders and standard TFDS sets."""

from __future__ import annotations

import os

from flaxcnn.data import catalog, digits, folder
from flaxcnn.data.catalog import load_tfds
from flaxcnn.data.dataset import Dataset
from flaxcnn.data.digits import NAME as DIGITS
from flaxcnn.data.digits import load_digits
from flaxcnn.data.folder import PREFIX as FOLDER_PREFIX
from flaxcnn.data.folder import load_folder


def load(
    name: str, *, data_dir: str | os.PathLike | None = None, skip_corrupt: bool = False
) -> Dataset:
    """Open a data set by name: ``"digits"``, ``"folder:PATH"`` or a TFDS name (``"cifar10"``).

    Prepares it first where needed and possible. Raises :class:`DatasetNotPrepared` or
    ``ValueError``, each with a one-line message, for unknown names, unprepared sets and
    unusable folders. ``skip_corrupt`` applies to folders: skip unreadable images and stray
    files instead of stopping. It is ignored for the digits and TFDS sets, which hold no
    files of the user's that could be corrupt, so a trainer can pass its flag unconditionally.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a data set name must be a non-empty string, got {name!r}")
    name = name.strip()
    if name == DIGITS:
        return load_digits(data_dir)
    if name.startswith(FOLDER_PREFIX):
        path = name[len(FOLDER_PREFIX) :]
        if not path:
            raise ValueError("folder: needs a path, as in folder:/data/my_images")
        return load_folder(path, data_dir=data_dir, skip_corrupt=skip_corrupt)
    return load_tfds(name, data_dir=data_dir)


def flips_keep_labels(name: str) -> bool:
    """What ``load(name).info.hflip`` says, from the name alone (nothing is read or
    prepared): whether a horizontal flip keeps an image's label. A resumed run resolves the
    default augmentation of its data set with it before the data are loaded."""
    name = name.strip()
    if name == DIGITS:
        return digits.HFLIP
    if name.startswith(FOLDER_PREFIX):
        return folder.HFLIP
    return catalog.flips_keep_labels(name)
