"""Where prepared data lives on disk, and how preparation avoids racing with itself."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tensorflow_datasets.core import constants


def default_data_dir() -> Path:
    """TFDS's local data directory: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``.

    ValueError when TFDS_DATA_DIR is set but empty: TFDS would take it for the current
    directory and prepare data sets wherever the command happens to run."""
    value = os.environ.get("TFDS_DATA_DIR")
    if value is not None and not value.strip():
        raise ValueError(
            "TFDS_DATA_DIR is set but empty: unset it (the default is ~/tensorflow_datasets) "
            "or set it to a directory"
        )
    return Path(value or constants.DATA_DIR).expanduser()


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    return default_data_dir() if data_dir is None else Path(data_dir).expanduser()


# Both spellings: the user may be at the command line or in Python.
DATA_DIR_HINT = "choose another with --data-dir (command line) or data_dir= (Python)"


def _unwritable(directory: Path) -> str | None:
    """Why ``directory`` (which may not exist yet) cannot be created or written into, or None.

    Looks only: the nearest existing ancestor must be a directory this process may write into.
    """
    path = directory
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    if not path.is_dir():
        return f"{path} is not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    return None


def check_writable(data_dir: Path, directories: Iterable[Path], what: str) -> None:
    """Raise ValueError (one line naming ``data_dir``) unless ``what`` can be prepared there.

    ``directories`` are where preparation creates files, all under ``data_dir``. Checked
    before anything is written, so that bad input leaves nothing behind.
    """
    for directory in (data_dir, *directories):
        reason = _unwritable(directory)
        if reason:
            raise ValueError(
                f"cannot prepare {what} in data dir {data_dir}: {reason}; {DATA_DIR_HINT}"
            )


def write_failed(data_dir: Path, what: str, error: OSError) -> ValueError:
    """The one-line ValueError for an OSError met while writing prepared data."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return ValueError(f"cannot prepare {what} in data dir {data_dir}: {reason}")


@contextlib.contextmanager
def exclusive_lock(
    lock_path: Path, *, data_dir: Path | None = None, what: str = "data"
) -> Iterator[None]:
    """Hold an advisory lock so that processes preparing the same data take turns.

    Several training processes on one machine may all call ``load`` at start-up: the first
    prepares, the others wait and then find the prepared data. Creating the lock file fails
    with a one-line ValueError naming ``data_dir`` (default: the lock's directory).
    """
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a")  # noqa: SIM115 - closed below, after the lock's release
    except OSError as error:
        raise write_failed(data_dir or lock_path.parent, what, error) from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
