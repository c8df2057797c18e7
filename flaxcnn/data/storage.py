"""Where prepared data lives on disk, and how preparation avoids racing with itself."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from tensorflow_datasets.core import constants


def default_data_dir() -> Path:
    """TFDS's local data directory: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    return Path(os.environ.get("TFDS_DATA_DIR") or constants.DATA_DIR).expanduser()


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    return default_data_dir() if data_dir is None else Path(data_dir).expanduser()


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an advisory lock so that processes preparing the same data take turns.

    Several training processes on one machine may all call ``load`` at start-up: the first
    prepares, the others wait and then find the prepared data.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
