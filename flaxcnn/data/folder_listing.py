"""Reading a ``folder:PATH`` data set's layout: classes, image files, test split, fingerprint.

Layout: ``PATH/<class>/**/<image>``, PNG or JPEG, with an optional ``PATH/test/<class>/...``
holding the test split and an optional ``PATH/val/<class>/...`` holding a validation split
(their classes must be the training classes). Hidden files and directories (names starting
with ".") are ignored; any other file that cannot be an example is a *stray*.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
TEST_DIR = "test"
VAL_DIR = "val"
TEST_FRACTION = 0.2
SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class Example:
    path: Path
    label: int


@dataclasses.dataclass(frozen=True)
class FolderListing:
    """Everything preparation needs to know before opening a single image."""

    root: Path
    class_names: tuple[str, ...]
    train: tuple[Example, ...]
    test: tuple[Example, ...]
    test_from_directory: bool
    strays: tuple[Path, ...]
    # (relative path, size, mtime in ns) of every non-hidden file: what the fingerprint hashes.
    file_stats: tuple[tuple[str, int, int], ...]
    val: tuple[Example, ...] = ()  # from PATH/val/, else none

    def fingerprint(self, *settings: object) -> str:
        """Changes when any file is added, removed, resized or touched, or a setting changes."""
        digest = hashlib.sha256(repr(settings).encode())
        for relative, size, mtime_ns in self.file_stats:
            digest.update(f"{relative}\0{size}\0{mtime_ns}\n".encode())
        return digest.hexdigest()[:20]


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _unusable_class_name(name: str) -> bool:
    """Names that would not come back as themselves from a printed report, a CSV row or a
    text field: with a line break or other control character, or spaces at either end."""
    return name != name.strip() or any(ord(c) < 32 or ord(c) == 127 for c in name)


def _subdirectories(directory: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and _visible(e.name))


def _walk_files(directory: Path) -> list[Path]:
    """Every visible file under ``directory``, in a fixed (sorted) order."""
    files = []
    for parent, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if _visible(d))
        files.extend(Path(parent, n) for n in sorted(names) if _visible(n))
    return files


def _class_examples(
    base: Path, class_names: tuple[str, ...], strays: list[Path]
) -> dict[str, list[Path]]:
    images: dict[str, list[Path]] = {}
    for name in class_names:
        files = _walk_files(base / name)
        images[name] = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
        strays.extend(f for f in files if f.suffix.lower() not in IMAGE_SUFFIXES)
    return images


def _stratified_split(
    images: dict[str, list[Path]], class_names: tuple[str, ...], where: str
) -> tuple[list[Example], list[Example]]:
    examples = [Example(p, label) for label, c in enumerate(class_names) for p in images[c]]
    labels = np.array([e.label for e in examples])
    too_few = [c for label, c in enumerate(class_names) if np.sum(labels == label) < 2]
    if too_few:
        raise ValueError(
            f"{where}: class {too_few[0]!r} has fewer than 2 images, too few to hold one out "
            f"for testing; add images or a {TEST_DIR}/ subdirectory with the test split"
        )
    from sklearn.model_selection import train_test_split  # 2 s of imports: only here

    train, test = train_test_split(
        np.arange(len(examples)), test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return [examples[i] for i in sorted(train)], [examples[i] for i in sorted(test)]


def _stat(file: Path, where: str) -> os.stat_result:
    """The file's stat, or for a broken symbolic link the link's own (preparation then reports
    or skips it as an unreadable image, and fixing the link changes the fingerprint)."""
    try:
        return file.stat()
    except OSError:
        try:
            return file.lstat()
        except OSError as error:  # Removed while listing, say.
            raise ValueError(f"{where}: cannot read {file}: {error.strerror or error}") from None


def list_folder(path: str | os.PathLike) -> FolderListing:
    """Walk and check a class-per-subdirectory image folder; ValueError (one line) if unusable."""
    where = f"folder:{path}"
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"{where}: no such directory")
    subdirs = _subdirectories(root)
    has_test, has_val = TEST_DIR in subdirs, VAL_DIR in subdirs
    class_names = tuple(d for d in subdirs if d not in (TEST_DIR, VAL_DIR))
    layout = f"expected one subdirectory of PNG/JPEG images per class ({root}/<class>/<image>)"
    if not class_names:
        raise ValueError(f"{where} has no class subdirectories; {layout}")
    for name in class_names:
        if _unusable_class_name(name):
            raise ValueError(
                f"{where}: the class directory {name!r} has a name that cannot stand as a class "
                "name (a line break, a control character, or a space at either end): rename it"
            )
    if len(class_names) == 1:
        raise ValueError(
            f"{where} has a single class ({class_names[0]!r}); a classifier needs at least two "
            "class subdirectories"
        )
    strays = [root / e.name for e in os.scandir(root) if e.is_file() and _visible(e.name)]
    images = _class_examples(root, class_names, strays)
    for name in class_names:
        if not images[name]:
            raise ValueError(f"{where}: class directory {name!r} has no PNG/JPEG images")

    if has_test:
        train = [Example(p, label) for label, c in enumerate(class_names) for p in images[c]]
        test = _split_directory(root / TEST_DIR, class_names, strays, where)
    else:
        train, test = _stratified_split(images, class_names, where)
    val = _split_directory(root / VAL_DIR, class_names, strays, where) if has_val else []

    file_stats = []
    for file in _walk_files(root):
        stat = _stat(file, where)
        file_stats.append((file.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    return FolderListing(
        root=root,
        class_names=class_names,
        train=tuple(train),
        test=tuple(test),
        test_from_directory=has_test,
        strays=tuple(sorted(strays)),
        file_stats=tuple(file_stats),
        val=tuple(val),
    )


def _split_directory(
    base: Path, class_names: tuple[str, ...], strays: list[Path], where: str
) -> list[Example]:
    """The examples of a split kept in its own directory (test/ or val/), which must hold a
    subdirectory for each training class and no other."""
    found = tuple(_subdirectories(base))
    if found != class_names:
        missing = sorted(set(class_names) - set(found))
        extra = sorted(set(found) - set(class_names))
        raise ValueError(
            f"{where}: {base.name}/ must have the same class subdirectories as the training "
            f"classes (missing: {missing}, unexpected: {extra})"
        )
    strays.extend(base / e.name for e in os.scandir(base) if e.is_file() and _visible(e.name))
    images = _class_examples(base, class_names, strays)
    examples = [Example(p, label) for label, c in enumerate(class_names) for p in images[c]]
    if not examples:
        raise ValueError(f"{where}: {base.name}/ has no PNG/JPEG images")
    return examples
