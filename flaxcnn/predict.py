"""`python -m flaxcnn.predict --workdir DIR IMAGE...`: the top classes of image files.

Restores a run's checkpoint (the best, else the latest, or the one at --step), rebuilds its
network from the metadata saved with it, and prints for each image the `--top` most
probable classes with their probabilities, so that a model can be checked by eye on a photo:
a trained run, or ImageNet weights converted from torchvision by `python -m flaxcnn.convert`.

An image reaches the network as the checkpoint's `preprocessing` metadata says
(`{"resize": R, "crop": C, "mean": [...], "std": [...]}`, mean/std on the 0..1 scale):

- R == C (trained runs): the centred square resized to C x C (`imaging.resize_square`),
  exactly the training and evaluation path;
- otherwise (torchvision's ImageNet weights: 256, 224): torchvision's `Resize(R)` (the
  shorter side to R, bilinear with antialiasing, which is Pillow's BILINEAR) and
  `CenterCrop(C)`;

then the channels are matched to the network's (grayscale repeated, RGB to luma) and each
channel normalised. Checkpoints written before the metadata recorded this are read with
R = C = image_size and the data set's own mean/std, which needs the data set.

Class names are the metadata's `class_descriptions` where it has them (the English ImageNet
names of converted weights), else its `class_names`. Nothing is written anywhere. jax,
orbax and the data layer are imported inside the functions that use them, so that --help
and bad arguments answer at once; every image is read before any model work.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flaxcnn import cli

PathLike = str | os.PathLike
DEFAULT_TOP = 5
DEFAULT_BATCH_SIZE = 32


# ------------------------------------------------------------------------------- images


def load_image(path: PathLike) -> np.ndarray:
    """A uint8 HxWxC array of the image file as displayed (EXIF orientation applied): RGB,
    or one channel for grayscale, decoded as folder data sets decode their images;
    UsageError naming the file when it cannot be read."""
    from flaxcnn.data.folder import StoragePlan, UnreadableImage, read_header, read_image

    path = Path(path)
    if not path.exists():
        raise cli.UsageError(f"image {path} does not exist")
    if path.is_dir():
        raise cli.UsageError(f"image {path} is a directory")
    try:
        width, height, grayscale = read_header(path)
        return read_image(path, StoragePlan(height, width, 1 if grayscale else 3, resize_to=None))
    except UnreadableImage as e:  # "cannot read image PATH: reason"
        raise cli.UsageError(str(e)) from None


def resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision's `Resize(size)` on a PIL image: the shorter side to `size`, the longer
    to `int(size * long / short)`, Pillow's bilinear (antialiased) resampling."""
    from PIL import Image

    height, width, channels = image.shape
    short, long = min(height, width), max(height, width)
    new_short, new_long = size, int(size * long / short)
    new_h, new_w = (new_long, new_short) if width <= height else (new_short, new_long)
    if (new_h, new_w) == (height, width):
        return image
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    resized = np.asarray(pil.resize((new_w, new_h), Image.Resampling.BILINEAR))
    return resized[..., None] if channels == 1 else resized


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision's `CenterCrop(size)`: offsets `round((side - size) / 2)` (Python's
    round, halves to even), and zero padding as torchvision's where the image is smaller."""
    height, width, _ = image.shape
    if size > height or size > width:
        pad_h, pad_w = max(size - height, 0), max(size - width, 0)
        image = np.pad(
            image, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0))
        )
        height, width, _ = image.shape
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return image[top : top + size, left : left + size]


def check_preprocessing(preprocessing: Any, channels: int) -> tuple[int, int, list, list]:
    """(resize, crop, mean, std) of a checkpoint's `preprocessing`; UsageError if unusable."""

    def bad(what: str) -> cli.UsageError:
        return cli.UsageError(f"the checkpoint's preprocessing metadata {what}: {preprocessing!r}")

    if not isinstance(preprocessing, dict):
        raise bad("is not a mapping")
    missing = [k for k in ("resize", "crop", "mean", "std") if k not in preprocessing]
    if missing:
        raise bad(f"lacks {', '.join(missing)}")
    resize, crop = preprocessing["resize"], preprocessing["crop"]
    for value in (resize, crop):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad("needs positive integers for resize and crop")
    stats = []
    for key in ("mean", "std"):
        value = preprocessing[key]
        try:
            value = [float(v) for v in value]
        except (TypeError, ValueError):
            raise bad(f"has a {key} that is not a list of numbers") from None
        if len(value) != channels:
            raise bad(f"has {len(value)} {key} value(s) for {channels} input channel(s)")
        stats.append(value)
    mean, std = stats
    if not all(np.isfinite(mean)) or not all(np.isfinite(s) and s > 0 for s in std):
        raise bad("needs finite means and positive standard deviations")
    return resize, crop, mean, std


def preprocess(image: np.ndarray, preprocessing: dict, channels: int) -> np.ndarray:
    """A uint8 HxWxC image as the network's float32 (crop, crop, channels) input.

    `preprocessing` is `{"resize": R, "crop": C, "mean": [...], "std": [...]}` (one mean and
    std per input channel, on the 0..1 scale). R == C: the centred square resized to C x C,
    as training does; otherwise torchvision's Resize(R) then CenterCrop(C). Then the channels
    are matched (`imaging.match_channels`) and normalised to `(x / 255 - mean) / std` with
    the pipelines' own arithmetic (`transforms.Normalize`).
    """
    from flaxcnn.data.imaging import match_channels, resize_square
    from flaxcnn.data.transforms import Normalize

    resize, crop, mean, std = check_preprocessing(preprocessing, channels)
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected a uint8 HxWx1 or HxWx3 image, got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"the image is empty: {image.shape}")
    if resize == crop:
        image = resize_square(image, crop)
    else:
        image = center_crop(resize_shorter(image, resize), crop)
    image = match_channels(np.ascontiguousarray(image), channels)
    batch = {"image": image[None], "label": np.zeros(1, np.int32)}
    return Normalize(mean, std).map(batch)["image"][0]


# ------------------------------------------------------------------------------- model


def class_labels(meta: dict) -> list[str]:
    """What each class is shown as: `class_descriptions` where present, else `class_names`."""
    num_classes = meta["num_classes"]
    descriptions = meta.get("class_descriptions")
    if isinstance(descriptions, list) and len(descriptions) == num_classes:
        return [str(d) for d in descriptions]
    names = meta["class_names"]
    if not isinstance(names, list) or len(names) != num_classes:
        count = len(names) if isinstance(names, list) else 0
        raise cli.UsageError(
            f"the checkpoint's metadata lists {count} class names for {num_classes} classes"
        )
    return [str(n) for n in names]


def resolve_preprocessing(meta: dict, config: dict) -> dict:
    """The checkpoint's `preprocessing`; for older checkpoints without it, R = C = image_size
    and the run's data set's mean/std (UsageError if the data set cannot be loaded)."""
    if "preprocessing" in meta:
        return meta["preprocessing"]
    from flaxcnn import data
    from flaxcnn.data.transforms import normalization

    dataset = meta["dataset"]
    try:
        info = data.load(
            dataset,
            data_dir=config.get("data_dir"),
            skip_corrupt=bool(config.get("skip_corrupt", False)),
        ).info
        mean, std = normalization(info, meta["in_channels"])
    except ValueError as e:  # DatasetNotPrepared is a ValueError too
        reason = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise cli.UsageError(
            f"the checkpoint records no preprocessing (an older run), and its data set "
            f"{dataset}, whose mean/std it needs, cannot be loaded: {reason}"
        ) from None
    size = meta["image_size"]
    return {
        "resize": size,
        "crop": size,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }


def probabilities(model, variables: dict, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """Softmax (in float32) of the network in eval mode, in batches of one shape (the last
    one padded) so that it compiles once."""
    import jax
    import jax.numpy as jnp

    from flaxcnn.training import evaluation

    @jax.jit
    def softmax(variables, images):
        logits = evaluation.logits(model.apply, variables, images)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    variables = jax.device_put(variables)
    size = min(batch_size, len(inputs))
    out = []
    for start in range(0, len(inputs), size):
        chunk = inputs[start : start + size]
        real = len(chunk)
        if real < size:
            chunk = np.concatenate([chunk, np.zeros((size - real, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(softmax(variables, chunk))[:real])
    return np.concatenate(out)


def top_classes(probs: np.ndarray, labels: Sequence[str], top: int) -> list[tuple[str, float]]:
    """The `top` (label, probability) pairs, most probable first (ties: lower index first)."""
    order = np.argsort(-probs, kind="stable")[:top]
    return [(labels[i], float(probs[i])) for i in order]


def predict(
    workdir: PathLike,
    images: Sequence[PathLike],
    *,
    top: int | None = None,
    step: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[list[tuple[str, float]]]:
    """For each image, its `top` most probable (class, probability) pairs, most probable first
    (by default DEFAULT_TOP, or every class of a network with fewer).

    `step` defaults to the best checkpoint, else the latest. Raises UsageError, having done
    no model work, for bad input: an unreadable image, a workdir without that checkpoint,
    `top` outside 1..num_classes, an architecture this version does not have.
    """
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if not images:
        raise cli.UsageError("no images given")
    if top is not None and top < 1:
        raise cli.UsageError(f"--top must be at least 1, got {top}")
    if batch_size < 1:
        raise cli.UsageError(f"--batch-size must be positive, got {batch_size}")
    from flaxcnn.training.rundir import RunDir  # here: it loads jax

    run = RunDir.existing(workdir)
    run.require_checkpoint(step)  # quick, before the images and orbax
    pixels = [load_image(path) for path in images]

    step, meta, variables = run.restore_variables(step)
    num_classes = meta["num_classes"]
    if top is None:
        top = min(DEFAULT_TOP, num_classes)
    if top > num_classes:
        raise cli.UsageError(f"--top {top} is more than the checkpoint's {num_classes} classes")
    labels = class_labels(meta)
    preprocessing = resolve_preprocessing(meta, run.read_config())
    inputs = np.stack([preprocess(p, preprocessing, meta["in_channels"]) for p in pixels])
    from flaxcnn.evaluate import build_model

    model = build_model(meta, variables)
    probs = probabilities(model, variables, inputs, batch_size)
    return [top_classes(p, labels, top) for p in probs]


# ------------------------------------------------------------------------------- command line


def report(images: Sequence[PathLike], results: list[list[tuple[str, float]]]) -> list[str]:
    """The text the CLI prints: the image's path, then one line per class."""
    lines = []
    for path, classes in zip(images, results, strict=True):
        lines.append(str(path))
        lines.extend(f"  {p:.4f}  {name}" for name, p in classes)
    return lines


def report_json(images: Sequence[PathLike], results: list[list[tuple[str, float]]]) -> list[str]:
    """One JSON object per image: `{"image", "top": [{"class", "probability"}]}`."""
    return [
        json.dumps(
            {
                "image": str(path),
                "top": [{"class": name, "probability": p} for name, p in classes],
            }
        )
        for path, classes in zip(images, results, strict=True)
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m flaxcnn.predict",
        description="The most probable classes of image files, from a run's checkpoint (a "
        "trained run, or weights converted by python -m flaxcnn.convert).",
    )
    parser.add_argument("--workdir", required=True, help="the run's workdir")
    parser.add_argument(
        "--top",
        type=int,
        help=f"classes per image (default: {DEFAULT_TOP}, or all of them where there are fewer)",
    )
    parser.add_argument(
        "--step", type=int, help="checkpoint step (default: the best, else the latest)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per image instead"
    )
    parser.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        results = predict(args.workdir, args.images, top=args.top, step=args.step)
    except cli.UsageError as e:
        cli.fail(str(e))
    print("\n".join((report_json if args.json else report)(args.images, results)))


if __name__ == "__main__":
    cli.run_main(main)
