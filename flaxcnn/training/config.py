"""Every setting of a training run, with its default and its `--help` text.

`flaxcnn.train` builds its command line from these fields, so the flags, their defaults
and the library's `TrainConfig` cannot drift apart. A run records the config it actually
used (defaults resolved) in `WORKDIR/config.json`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from flaxcnn.cli import UsageError
from flaxcnn.training import optim, parallel

# flaxcnn.data.transforms.AUGMENTATIONS after "default", spelled out here because the data
# layer takes a second to import and `--help` should not wait for it (a test keeps them equal).
AUGMENT_CHOICES = ("default", "none", "crop", "crop+flip")


def setting(default, help: str, **flag):
    return dataclasses.field(default=default, metadata={"help": help, **flag})


@dataclasses.dataclass
class TrainConfig:
    arch: str = setting(None, "architecture to train (python -m flaxcnn.models lists them)")
    dataset: str = setting(
        "digits",
        "data set: 'digits' (embedded, offline), a TFDS name such as cifar10, or "
        "folder:PATH (one subdirectory of images per class)",
    )
    data_dir: str | None = setting(
        None, "where prepared data sets live (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)"
    )
    epochs: int = setting(30, "passes over the training split")
    batch_size: int | None = setting(
        None,
        "global batch: all devices of all processes together; must divide evenly (default: "
        "128, halved for small training splits until an epoch has at least "
        "20 steps, down to 8)",
    )
    optimizer: str = setting(
        "sgd", "sgd (Nesterov momentum 0.9) or adamw", choices=optim.OPTIMIZERS
    )
    lr: float | None = setting(
        None,
        "learning rate for a global batch of 256, scaled linearly with --batch-size down to "
        "a batch of 64, whose rate smaller batches keep (default: 0.1 for sgd, 0.001 for "
        "adamw)",
    )
    schedule: str = setting(
        "cosine",
        "cosine: linear warmup then cosine decay to 0; step: x0.1 at 50%% and 75%%; constant",
        choices=optim.SCHEDULES,
    )
    # The defaults of warmup, label smoothing and (resolve.py) the batch for small splits
    # are the main job's recipe, chosen by measurement over seeds and thread counts
    # (docs/main-job.md).
    warmup_epochs: float = setting(3.0, "epochs of linear warmup from 0 to the learning rate")
    weight_decay: float | None = setting(
        None,
        "weight decay on conv and dense kernels, never on biases or BatchNorm "
        "(default: 5e-4 for sgd, 0.05 for adamw)",
    )
    label_smoothing: float = setting(
        0.1, "label smoothing in [0, 1): the training targets' share spread over all classes"
    )
    model_options: dict[str, Any] | None = setting(  # noqa: RUF009 (the default is None)
        None,
        "an option of the architecture, repeatable, e.g. aux_logits=true (googlenet), "
        "activation=tanh (lenet5), scan_blocks=true (resnets); "
        "python -m flaxcnn.models --options ARCH lists them",
        flag="model-option",
        metavar="KEY=VALUE",
    )
    dropout: float | None = setting(
        None, "dropout rate, for models that have dropout (default: the model's own)"
    )
    dtype: str = setting(
        "float32",
        "compute dtype; parameters and optimizer state stay float32",
        choices=("float32", "bfloat16"),
    )
    image_size: int | None = setting(
        None,
        "square input side (default: the data set's, raised to the model's minimum; small "
        "images use the model's small-input stem where it has one)",
    )
    augment: str = setting(
        "default",
        "random augmentation of the training images: none; crop (random shifts by up to 4 px "
        "at 32 px, in proportion at other sizes, zero-padded); crop+flip (and horizontal "
        "flips) (default: the data set's own: crop for digits and other characters, which a "
        "mirror changes, crop+flip for the rest; none for a training split of fewer than 1280 "
        "images, where crops slowed learning more than they helped)",
        choices=AUGMENT_CHOICES,
    )
    skip_corrupt: bool = setting(
        False, "folder data sets: leave out images that cannot be decoded instead of stopping"
    )
    val_fraction: float = setting(
        0.1,
        "share of the training split held out (the same images for every seed) to choose the "
        "best checkpoint on, where the data set has no validation split of its own (TFDS "
        "validation beside test, a folder's val/); 0: none, the best checkpoint is then the "
        "latest (nothing is chosen on the test split)",
    )
    precise_bn: int = setting(
        4,
        "before each evaluation, recompute BatchNorm statistics over this many training "
        "batches (no augmentation) with the current weights; 0 keeps the running averages",
    )
    seed: int = setting(0, "seed for initialisation, shuffling, augmentation and dropout")
    workdir: str | None = setting(None, "output directory (default: runs/ARCH-DATASET-TIMESTAMP)")
    resume: bool | None = setting(
        None,
        "continue from the workdir's latest checkpoint with the settings stored in its "
        "config.json (default: yes when it has one; --workdir alone is enough)",
    )
    accept_new_data: bool = setting(
        False, "resume even though the data set changed since the run started (a folder)"
    )
    checkpoint_every: int | None = setting(
        None, "steps between checkpoints (default: one epoch); one is always saved at the end"
    )
    keep_checkpoints: int = setting(
        2,
        "how many recent checkpoints to keep, plus the best (two: the newest and one to fall "
        "back on if the newest is damaged)",
    )
    eval_every: int = setting(1, "epochs between evaluations on the test split")
    log_every: int = setting(10, "steps between progress-bar updates (each one syncs the host)")
    parallel: str = setting(
        "pmap", "data-parallel strategy over all devices", choices=parallel.STRATEGIES
    )
    coordinator_address: str | None = setting(
        None, "HOST:PORT of process 0, to train over several processes/hosts"
    )
    num_processes: int | None = setting(None, "number of processes (with --coordinator-address)")
    process_id: int | None = setting(None, "this process's index (with --coordinator-address)")
    coordinator_timeout: int = setting(
        300, "seconds to wait for every process to join before giving up"
    )
    init_from: str | None = setting(
        None,
        "workdir or checkpoint directory of the same architecture to start from; the "
        "classifier is re-initialised when the class count differs",
    )
    freeze_backbone: bool = setting(
        False,
        "with --init-from: train only the classifier's last layer; the rest keeps the "
        "source's weights and BatchNorm statistics (inference mode, no dropout)",
    )
    workers: int = setting(0, "data worker processes (0: background threads only)")
    progress: bool = setting(
        True, "show a progress bar per epoch on stderr (only when it is a terminal)"
    )

    def validate(self) -> None:
        """Reject bad values before anything is read or written (UsageError, exit code 2)."""
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "keep_checkpoints": self.keep_checkpoints,
            "eval_every": self.eval_every,
            "log_every": self.log_every,
            "image_size": self.image_size,
            "checkpoint_every": self.checkpoint_every,
            "lr": self.lr,
            "num_processes": self.num_processes,
            "coordinator_timeout": self.coordinator_timeout,
        }
        for name, value in positive.items():
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise UsageError(f"--{flag(name)} must be positive, got {value}")
        non_negative = {
            "warmup_epochs": self.warmup_epochs,
            "weight_decay": self.weight_decay,
            "workers": self.workers,
            "process_id": self.process_id,
            "precise_bn": self.precise_bn,
        }
        for name, value in non_negative.items():
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise UsageError(f"--{flag(name)} must be >= 0, got {value}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**32):
            raise UsageError(f"--seed must be an integer from 0 to 2**32 - 1, got {self.seed}")
        if self.arch is None:
            raise UsageError("--arch is required (python -m flaxcnn.models lists them)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UsageError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not (isinstance(self.val_fraction, int | float) and 0.0 <= self.val_fraction < 1.0):
            raise UsageError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout must be in [0, 1), got {self.dropout}")
        for name, allowed in (
            ("optimizer", optim.OPTIMIZERS),
            ("schedule", optim.SCHEDULES),
            ("parallel", parallel.STRATEGIES),
            ("dtype", ("float32", "bfloat16")),
            ("augment", AUGMENT_CHOICES),
        ):
            if getattr(self, name) not in allowed:
                raise UsageError(
                    f"unknown --{name} {getattr(self, name)!r}; choose from {', '.join(allowed)}"
                )
        multi = (self.coordinator_address, self.num_processes, self.process_id)
        if any(v is not None for v in multi) and not all(v is not None for v in multi):
            raise UsageError("--coordinator-address, --num-processes and --process-id go together")
        if self.num_processes is not None and self.process_id >= self.num_processes:
            raise UsageError(
                f"--process-id must be below --num-processes ({self.num_processes}), "
                f"got {self.process_id}"
            )

        if self.freeze_backbone and not self.init_from:
            raise UsageError("--freeze-backbone needs --init-from (the weights to keep fixed)")
        if self.model_options is not None and not isinstance(self.model_options, dict):
            raise UsageError(f"model_options must be a dict, got {self.model_options!r}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def flag(name: str) -> str:
    return name.replace("_", "-")
