"""``folder:PATH`` data sets: a user's class-per-subdirectory images as a TFDS data set.

Preparation decodes every image once with Pillow and writes the same array_record form as
the digits (PNG bytes into a tfds ``Image`` feature; no TensorFlow), read back through
``tfds.builder_from_directory``. It runs again only when the folder's contents change: the
prepared copy lives under ``<data_dir>/flaxcnn_folders/<name>-<path hash>/<fingerprint>``,
where the fingerprint hashes every file's name, size and mtime plus the settings below.

Stored size: when all images share one size (at most 256 px a side) they keep it; otherwise
each is centre-cropped to a square and resized to S x S, S = the median shorter side capped
at 256 (so the pipelines can still resize to any model's input without starting from
thumbnails). Channels: 1 when every image is grayscale, else 3 (grayscale converted to RGB,
alpha dropped). EXIF orientation is applied.

Crash safety: tfds writes into a staging directory next to the target, which is renamed into
place (atomic on one filesystem) only once complete; a killed preparation leaves only a
hidden ``.incomplete-*`` directory, removed by the next preparation. A previously prepared
copy is deleted only after its replacement is in place. A file lock makes concurrent
processes on one machine take turns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from PIL import ExifTags, Image, ImageOps

from flaxcnn.data import folder_listing
from flaxcnn.data.builders import VALIDATION, dataset_from_builder, prepare_array_record
from flaxcnn.data.dataset import Dataset
from flaxcnn.data.folder_listing import Example, FolderListing, list_folder
from flaxcnn.data.imaging import ChannelStats, encode_png, resize_square
from flaxcnn.data.storage import (
    check_writable,
    exclusive_lock,
    resolve_data_dir,
    write_failed,
)

PREFIX = "folder:"
HFLIP = True  # photographs of things: a mirror image shows the same thing
PREPARED_DIR = "flaxcnn_folders"
STAGING_PREFIX = ".incomplete-"
MAX_STORED_SIDE = 256
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# EXIF orientations that swap width and height.
TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
SKIPPED_SHOWN = 5  # skipped files named one per line; the rest are counted
# Both spellings: the user may be at the command line or in Python.
SKIP_HINT = "skip them with --skip-corrupt (command line) or skip_corrupt=True (Python)"


class UnreadableImage(ValueError):
    """An image file Pillow cannot decode; its str names the file."""


@dataclasses.dataclass(frozen=True)
class StoragePlan:
    """The stored (H, W, C) and whether images are squared and resized to get there."""

    height: int
    width: int
    channels: int
    resize_to: int | None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.height, self.width, self.channels


def _unreadable(path: Path, error: Exception) -> UnreadableImage:
    if path.is_symlink() and not path.exists():  # Dangling, or a loop of links.
        reason = f"broken symbolic link to {os.readlink(path)}"
    else:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return UnreadableImage(f"cannot read image {path}: {reason}")


def read_header(path: Path) -> tuple[int, int, bool]:
    """(width, height, grayscale) as displayed, from the header alone."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            # Only JPEG keeps EXIF in its header (Pillow decodes a whole PNG to look for it).
            orientation = (
                image.getexif().get(ExifTags.Base.Orientation) if image.format == "JPEG" else None
            )
            if orientation in TRANSPOSING_ORIENTATIONS:
                width, height = height, width
            return width, height, image.mode in GRAY_MODES
    except Exception as error:  # Pillow raises many types for bad files.
        raise _unreadable(path, error) from error


def read_image(path: Path, plan: StoragePlan) -> np.ndarray:
    """Decode, orient, convert and (if planned) resize one image to uint8 HxWxC."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I"):  # 16/32-bit grayscale: scale 0..65535 to 0..255.
                pixels = np.asarray(image, dtype=np.float64) / 257.0
                pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)[..., None]
                if plan.channels == 3:
                    pixels = np.repeat(pixels, 3, axis=-1)
            else:
                converted = image.convert("L" if plan.channels == 1 else "RGB")
                pixels = np.asarray(converted, dtype=np.uint8).reshape(
                    converted.height, converted.width, plan.channels
                )
    except Exception as error:  # Pillow raises many types for bad files.
        raise _unreadable(path, error) from error
    return resize_square(pixels, plan.resize_to) if plan.resize_to else pixels


def storage_plan(headers: Sequence[tuple[int, int, bool]]) -> StoragePlan:
    channels = 1 if all(gray for _, _, gray in headers) else 3
    sizes = {(width, height) for width, height, _ in headers}
    if len(sizes) == 1:
        width, height = sizes.pop()
        if max(width, height) <= MAX_STORED_SIDE:
            return StoragePlan(height, width, channels, resize_to=None)
    side = min(MAX_STORED_SIDE, int(np.median([min(w, h) for w, h, _ in headers])))
    return StoragePlan(side, side, channels, resize_to=side)


class FolderImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One prepared image folder; read back with ``tfds.builder_from_directory``."""

    name = "folder_images"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "PNG-encoded uint8 images, one class per subdirectory."
    }

    def __init__(
        self,
        *,
        listing: FolderListing,
        train: Sequence[Example],
        test: Sequence[Example],
        val: Sequence[Example],
        plan: StoragePlan,
        skip_corrupt: bool,
        skipped: Sequence[str],
        data_dir: str,
    ):
        self._listing = listing
        self._examples = {"train": train, "test": test}
        if val:
            self._examples[VALIDATION] = val
        self._plan = plan
        self._skip_corrupt = skip_corrupt
        self._skipped = list(skipped)
        self._train_stats = ChannelStats(plan.channels)
        super().__init__(data_dir=data_dir)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Images from {self._listing.root}, one class per subdirectory.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=self._plan.shape),
                    "label": tfds.features.ClassLabel(names=list(self._listing.class_names)),
                }
            ),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Everything is local.
        return {
            split: self._generate_examples(
                examples, self._train_stats if split == "train" else None
            )
            for split, examples in self._examples.items()
        }

    def _generate_examples(
        self, examples: Sequence[Example], stats: ChannelStats | None
    ) -> Iterator[tuple[str, dict]]:
        for example in examples:
            try:
                image = read_image(example.path, self._plan)
            except UnreadableImage:
                if not self._skip_corrupt:
                    raise
                self._skipped.append(self._relative(example.path))
                continue
            if stats is not None:
                stats.update(image)
            yield self._relative(example.path), {"image": encode_png(image), "label": example.label}

    def _relative(self, path: Path) -> str:
        return path.relative_to(self._listing.root).as_posix()

    def _download_and_prepare(self, dl_manager, download_config) -> None:
        super()._download_and_prepare(dl_manager, download_config)
        # The training statistics are complete now; tfds writes the metadata right after.
        self.info.metadata.update(
            mean=self._train_stats.mean,
            std=self._train_stats.std,
            hflip=HFLIP,
            source=str(self._listing.root),
            split=(
                {"method": f"{folder_listing.TEST_DIR}/ subdirectory"}
                if self._listing.test_from_directory
                else {
                    "method": "sklearn.model_selection.train_test_split, stratified",
                    "test_fraction": folder_listing.TEST_FRACTION,
                    "seed": folder_listing.SPLIT_SEED,
                }
            ),
            validation=f"{folder_listing.VAL_DIR}/ subdirectory" if self._listing.val else None,
            resized_to=self._plan.resize_to,
            skipped=sorted(self._skipped),
        )


def _readable(
    examples: Sequence[Example], skip_corrupt: bool, skipped: list[str], root: Path
) -> tuple[list[Example], list[tuple[int, int, bool]]]:
    kept, headers = [], []
    for example in examples:
        try:
            headers.append(read_header(example.path))
        except UnreadableImage:
            if not skip_corrupt:
                raise
            skipped.append(example.path.relative_to(root).as_posix())
            continue
        kept.append(example)
    return kept, headers


@dataclasses.dataclass(frozen=True)
class Checked:
    """The examples whose headers Pillow read, the plan for storing them, and what is skipped."""

    train: list[Example]
    test: list[Example]
    val: list[Example]
    plan: StoragePlan
    skipped: list[str]


def check_images(listing: FolderListing, skip_corrupt: bool) -> Checked:
    """Read every image's header: UnreadableImage unless ``skip_corrupt``. Writes nothing."""
    skipped = [p.relative_to(listing.root).as_posix() for p in listing.strays]
    train, train_headers = _readable(listing.train, skip_corrupt, skipped, listing.root)
    test, test_headers = _readable(listing.test, skip_corrupt, skipped, listing.root)
    val, val_headers = _readable(listing.val, skip_corrupt, skipped, listing.root)
    if not train or not test or (listing.val and not val):
        raise ValueError(f"{PREFIX}{listing.root}: no readable images left in a split")
    plan = storage_plan(train_headers + test_headers + val_headers)
    return Checked(train, test, val, plan, skipped)


def _prepare(listing: FolderListing, checked: Checked, target: Path, skip_corrupt: bool) -> None:
    """Prepare into a staging directory beside ``target`` and rename it into place."""
    home = target.parent
    for leftover in home.glob(f"{STAGING_PREFIX}*"):  # from killed preparations
        shutil.rmtree(leftover, ignore_errors=True)
    staging = home / f"{STAGING_PREFIX}{target.name}-{os.getpid()}"
    try:
        builder = FolderImages(
            listing=listing,
            train=checked.train,
            test=checked.test,
            val=checked.val,
            plan=checked.plan,
            skip_corrupt=skip_corrupt,
            skipped=checked.skipped,
            data_dir=os.fspath(staging),
        )
        prepare_array_record(builder, quiet=True, shown_dir=target)
        try:
            os.rename(builder.data_path, target)
        except OSError:
            if not _is_prepared(target):  # Else another machine sharing the disk won the race.
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for older in home.iterdir():  # Superseded preparations of this folder.
        if older.is_dir() and older != target and not older.name.startswith("."):
            shutil.rmtree(older, ignore_errors=True)


def _is_prepared(directory: Path) -> bool:
    return (directory / "dataset_info.json").is_file()


def prepared_home(root: Path, data_dir: str | os.PathLike | None) -> Path:
    """Where the prepared copies of the folder ``root`` live."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", root.name) or "root"
    path_hash = hashlib.sha256(os.fsencode(root)).hexdigest()[:8]
    return resolve_data_dir(data_dir) / PREPARED_DIR / f"{slug}-{path_hash}"


def report_skipped(root: Path, skipped: Sequence[str], listed_in: Path) -> None:
    """A note on stderr for each file --skip-corrupt left out (the first SKIPPED_SHOWN, then
    how many more and where all are listed), so that a user sees which images are missing."""
    for name in skipped[:SKIPPED_SHOWN]:
        print(f"note: skipped {root / name}: not a readable PNG/JPEG image", file=sys.stderr)
    if len(skipped) > SKIPPED_SHOWN:
        print(
            f"note: and {len(skipped) - SKIPPED_SHOWN} more; all {len(skipped)} skipped files "
            f'are listed under "skipped" in {listed_in}',
            file=sys.stderr,
        )


def load_folder(
    path: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    skip_corrupt: bool = False,
) -> Dataset:
    """Open an image folder, preparing it first if it is new or its files changed.

    Unreadable images and stray non-image files stop preparation with a one-line
    ValueError naming a file, unless ``skip_corrupt`` (then they are skipped, named on
    stderr at every load, and listed under ``skipped`` in the prepared data set's metadata).
    """
    listing = list_folder(path)
    where = f"{PREFIX}{listing.root}"
    if listing.strays and not skip_corrupt:
        first = listing.strays[0].relative_to(listing.root).as_posix()
        raise ValueError(
            f"{where}: {len(listing.strays)} file(s) are not PNG/JPEG images in a class "
            f"directory (first: {first}); remove them, or {SKIP_HINT}"
        )
    fingerprint = listing.fingerprint(
        str(FolderImages.VERSION),
        skip_corrupt,
        MAX_STORED_SIDE,
        folder_listing.TEST_FRACTION,
        folder_listing.SPLIT_SEED,
        # Only where it matters: folders prepared before val/ was a split keep their copy.
        *([folder_listing.VAL_DIR] if listing.val else []),
    )
    home = prepared_home(listing.root, data_dir)
    prepared = home / fingerprint
    if not _is_prepared(prepared):
        # The data dir and every image's header are checked before anything is written (an
        # image whose header reads but whose pixels do not still stops the preparation).
        root = resolve_data_dir(data_dir)
        check_writable(root, [home], where)
        try:
            checked = check_images(listing, skip_corrupt)
            with exclusive_lock(home / ".lock", data_dir=root, what=where):
                if not _is_prepared(prepared):
                    try:
                        _prepare(listing, checked, prepared, skip_corrupt)
                    except OSError as error:  # Images are read as UnreadableImage: a full disk.
                        raise write_failed(root, where, error) from None
        except UnreadableImage as error:
            raise ValueError(
                f"{where}: {error}; remove unreadable images, or {SKIP_HINT}"
            ) from None
    builder = tfds.builder_from_directory(os.fspath(prepared))
    metadata = builder.info.metadata
    report_skipped(listing.root, metadata["skipped"], prepared / "metadata.json")
    dataset = dataset_from_builder(
        builder, name=where, mean=metadata["mean"], std=metadata["std"], hflip=metadata["hflip"]
    )
    info = dataclasses.replace(dataset.info, fingerprint=fingerprint)
    return dataclasses.replace(dataset, info=info)
