"""`flaxcnn.bench --loop`: the trainer's own loop on the digits, against the pure step.

The pure step (`flaxcnn.bench`) reuses one batch already on the devices. The trainer also
reads, augments and batches every example on the host, copies each batch to the devices,
and waits for them every `log_every` steps to log its running figures. `--loop` runs
`training.loop.Trainer.train_epoch`, epoch after epoch, on the embedded digits (the
trainer's default data set), with the trainer's defaults otherwise, and writes each
epoch's record as the trainer does; it neither evaluates nor saves checkpoints (those
come after an epoch's timing in the trainer anyway). Work dir and prepared data live in a
temporary directory, removed afterwards.

The network, input size and global batch are the trainer's for the digits (8x8 images:
ResNets take their small stem at 8x8, LeNet-5 its 32x32, ...), and the pure step is
benchmarked at exactly that. The loop's figure is the median of the trainer's own
images/s of every epoch after the first, whose compile it excludes.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flaxcnn import cli
from flaxcnn.training.build import Network, create_train_state
from flaxcnn.training.config import TrainConfig
from flaxcnn.training.loop import Trainer
from flaxcnn.training.resolve import Setup, prepare
from flaxcnn.training.rundir import RunDir

DATASET = "digits"
DEFAULT_EPOCHS = 3  # the first compiles; the others are timed
MIN_EPOCHS = 2


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A temporary directory for the loops' work dirs and prepared data, removed after."""
    with tempfile.TemporaryDirectory(prefix="flaxcnn-bench-loop-") as path:
        yield Path(path)


@contextlib.contextmanager
def _preparing_in(root: Path) -> Iterator[None]:
    """Prepare the digits without a trace outside `root`.

    The preparation says "preparing digits once in ROOT/data" (misleading for data that
    go with the benchmark), and tfds leaves two empty temporary directories behind
    (`DatasetInfo.initialize_from_bucket`'s `mkdtemp`): here they go into `root` too.
    """
    previous = tempfile.tempdir
    tempfile.tempdir = str(root)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        tempfile.tempdir = previous


def setup(
    arch: str,
    root: Path,
    *,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int | None = None,
    image_size: int | None = None,
    dtype: str = "float32",
    parallel: str = "pmap",
    num_classes: int | None = None,
) -> Setup:
    """The trainer's resolved run of `arch` on the digits under `root`; UsageError if bad."""
    if not (isinstance(epochs, int) and epochs >= MIN_EPOCHS):
        raise cli.UsageError(
            f"--loop-epochs must be at least {MIN_EPOCHS} (the first one compiles), got {epochs}"
        )
    config = TrainConfig(
        arch=arch,
        dataset=DATASET,
        data_dir=str(root / "data"),
        workdir=str(root / f"run-{arch}"),
        epochs=epochs,
        batch_size=batch_size,
        image_size=image_size,
        dtype=dtype,
        parallel=parallel,
        precise_bn=0,  # only used before evaluations, which the benchmark does not run
        progress=False,
    )
    with _preparing_in(root):
        resolved = prepare(config)
    classes = resolved.network.num_classes
    if num_classes is not None and num_classes != classes:
        raise cli.UsageError(
            f"--loop trains on {DATASET}, which has {classes} classes; leave out --num-classes"
        )
    return resolved


def check_same(s: Setup, network: Network, batch_size: int) -> None:
    """The pure step measures what the loop trains: the same network and global batch."""
    if s.network != network or s.batch_size != batch_size:
        raise cli.UsageError(
            f"--loop: the trainer builds {s.network} with batch {s.batch_size}, the "
            f"benchmark {network} with batch {batch_size}; they must agree"
        )


def run(s: Setup, step_images_per_sec: float) -> dict[str, Any]:
    """Train `s.config.epochs` epochs with the trainer's loop; its figures against the step's."""
    run_dir = RunDir(s.workdir)
    run_dir.create()
    tx, schedule = s.optimizer.build()
    state = create_train_state(s.network, tx, s.config.seed)
    records = []
    with Trainer(s, run_dir, state, schedule, None, out=lambda line: None) as trainer:
        for epoch in range(s.config.epochs):
            record = trainer.train_epoch(epoch)
            trainer.log(record)  # as end_epoch, after the epoch's timing
            records.append(record)
    rates = [r["images_per_sec"] for r in records]
    loop_rate = statistics.median(rates[1:])
    return {
        "loop_images_per_sec": loop_rate,
        "loop_ratio_to_step": loop_rate / step_images_per_sec,
        "loop": {
            "dataset": DATASET,
            "batch_size": s.batch_size,
            "image_size": s.network.image_size,
            "model_options": s.network.options,
            "epochs": s.config.epochs,
            "steps_per_epoch": s.steps_per_epoch,
            "log_every": s.config.log_every,
            "workers": s.config.workers,
            "epoch_images_per_sec": rates,
            "timed_epochs": len(rates) - 1,
            "images_per_sec": loop_rate,
            "step_images_per_sec": step_images_per_sec,
            "ratio_to_step": loop_rate / step_images_per_sec,
            "method": "median of the trainer's own images/s (Trainer.train_epoch) over the "
            "epochs after the first; no evaluation, no checkpoints",
        },
    }
