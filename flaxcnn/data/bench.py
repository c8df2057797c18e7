"""``python -m flaxcnn.data.bench``: images per second the training pipeline delivers.

Measures the host alone (no model, no accelerator): how fast batches come out of
``iter(TrainPipeline(...))`` once it is running, plus the time to the first batch.
"""

from __future__ import annotations

import dataclasses
import time

from flaxcnn import cli
from flaxcnn.data.dataset import Dataset
from flaxcnn.data.loading import load
from flaxcnn.data.pipeline import TrainPipeline


@dataclasses.dataclass(frozen=True)
class Throughput:
    images_per_sec: float
    batches: int
    first_batch_sec: float


def measure_throughput(
    dataset: Dataset,
    *,
    global_batch_size: int = 128,
    image_size: int = 32,
    channels: int = 3,
    augment: bool = True,
    worker_count: int = 0,
    batches: int = 300,
    seed: int = 0,
) -> Throughput:
    """Time ``batches`` batches after the first (which pays for start-up and caching)."""
    if batches < 1:
        raise ValueError(f"batches must be positive, got {batches}")
    start = time.perf_counter()
    pipeline = TrainPipeline(
        dataset,
        global_batch_size=global_batch_size,
        image_size=image_size,
        channels=channels,
        seed=seed,
        augment="default" if augment else "none",
        process_index=0,
        process_count=1,
        worker_count=worker_count,
    )
    iterator = iter(pipeline)
    try:
        next(iterator)
        first_batch = time.perf_counter() - start
        start = time.perf_counter()
        images = sum(len(next(iterator)["label"]) for _ in range(batches))
        elapsed = time.perf_counter() - start
    finally:
        iterator.close()
    return Throughput(images / elapsed, batches, first_batch)


def check_batches_fit(batch_size: int, image_size: int, channels: int, workers: int) -> None:
    """Refuse, in one line, batches that the read-ahead buffers could not hold in memory
    (`--image-size 100000` grew past 3 GB in seconds before failing)."""
    from flaxcnn.data.prefetch import PREFETCH_BATCHES
    from flaxcnn.training.memory import available_bytes, format_bytes

    batch = batch_size * image_size * image_size * channels * 4  # float32
    needed = batch * (PREFETCH_BATCHES + 2) * max(1, workers)  # buffered, in hand, being made
    limit, device = available_bytes()
    if needed > limit:
        cli.fail(
            f"batches of {batch_size} at {image_size}x{image_size}x{channels} need about "
            f"{format_bytes(needed)} read ahead, more than the {format_bytes(limit)} available "
            f"to this {device}: lower --image-size or --batch-size"
        )


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(
        prog="python -m flaxcnn.data.bench",
        description="Images per second the training data pipeline delivers once it runs, and "
        "the time to its first batch: the host alone, no model and no accelerator.",
    )
    parser.add_argument("--dataset", default="digits", help="digits, folder:PATH or a TFDS name")
    parser.add_argument(
        "--data-dir", default=None, help="default: $TFDS_DATA_DIR or ~/tensorflow_datasets"
    )
    parser.add_argument(
        "--batch-size", type=int, default=128, help="global batch size (default: %(default)s)"
    )
    parser.add_argument(
        "--image-size", type=int, default=32, help="square image side (default: %(default)s)"
    )
    parser.add_argument(
        "--channels", type=int, default=3, choices=(1, 3), help="1 or 3 (default: %(default)s)"
    )
    parser.add_argument(
        "--no-augment", dest="augment", action="store_false", help="no random crops and flips"
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="grain worker processes (default: %(default)s)"
    )
    parser.add_argument(
        "--batches", type=int, default=300, help="batches to time (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    # Checked before loading, which may prepare (write) the data set.
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--image-size", args.image_size),
        ("--batches", args.batches),
    ):
        if value < 1:
            cli.fail(f"{flag} must be positive, got {value}")
    if args.workers < 0:
        cli.fail(f"--workers must be >= 0, got {args.workers}")
    check_batches_fit(args.batch_size, args.image_size, args.channels, args.workers)
    try:
        dataset = load(args.dataset, data_dir=args.data_dir)
        result = measure_throughput(
            dataset,
            global_batch_size=args.batch_size,
            image_size=args.image_size,
            channels=args.channels,
            augment=args.augment,
            worker_count=args.workers,
            batches=args.batches,
        )
    except ValueError as error:  # DatasetNotPrepared and UsageError are ValueErrors too.
        cli.fail(str(error))
    print(
        f"{args.dataset} {args.image_size}x{args.image_size}x{args.channels}"
        f"{' augmented' if args.augment else ''}, global batch {args.batch_size}, "
        f"{args.workers} worker process(es): {result.images_per_sec:,.0f} images/s over "
        f"{result.batches} batches (first batch after {result.first_batch_sec:.2f} s)"
    )


if __name__ == "__main__":
    cli.run_main(main)
