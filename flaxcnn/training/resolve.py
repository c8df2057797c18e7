"""From a `TrainConfig` and its data to every number a run needs, before anything is written.

`prepare(config)` validates all it can without compiling: the architecture, its options
(typed against the module's fields), the data set, the input size (and the small-input
stem for small images), the batch size (chosen for small training splits when the user did
not), the optimizer, and the network's shape by abstract evaluation. Bad input raises
`UsageError` here, with nothing created or written.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path
from typing import Any

import jax

from flaxcnn import data, models
from flaxcnn.cli import UsageError
from flaxcnn.data.transforms import normalization, resolve_augment
from flaxcnn.models import summary
from flaxcnn.models.parsing import parse_options
from flaxcnn.training import memory, optim, resume
from flaxcnn.training.build import Network
from flaxcnn.training.config import TrainConfig

DEFAULT_BATCH_SIZE = 128
FOLDER = "folder:"
MIN_STEPS_PER_EPOCH = 20  # the default batch halves until an epoch has this many steps...
MIN_DEFAULT_BATCH = 8  # ...but not below this
# Training splits smaller than this (their default batch falls below 64) train without
# random crops by default: in the few steps of a short run, crops slowed learning more than
# they helped on the digit folders and for resnet20 on the shape folders measured (only the
# FC-headed small nets did a little better with them on one, and learned none of the shape
# folders either way; docs/small-data.md).
SMALL_SPLIT = MIN_STEPS_PER_EPOCH * optim.LR_MIN_BATCH


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """Where the epochs fall among a run's steps.

    From `start_step` on, epochs are `steps_per_epoch` steps long, the first of them
    epoch `start_epoch` (counted from 0). A run starts with the plan (n, 0, 0). A run
    continued on data whose size changed (`--accept-new-data`) gets a new plan from the
    step it reached (`replanned`): its finished epochs stay finished, the one in progress
    ends after the new epoch's length, and the rest follow at the new length.
    """

    steps_per_epoch: int
    start_step: int = 0
    start_epoch: int = 0

    def epoch_of(self, step: int) -> int:
        """The epoch (from 0) that the step after `step` belongs to."""
        return self.start_epoch + (step - self.start_step) // self.steps_per_epoch

    def epoch_end(self, epoch: int) -> int:
        """The step at which `epoch` (from 0) ends."""
        return self.start_step + (epoch - self.start_epoch + 1) * self.steps_per_epoch

    def total_steps(self, epochs: int) -> int:
        return self.epoch_end(epochs - 1)

    def data_index(self, step: int) -> int:
        """The index, in the data pipeline's stream of batches, of the batch after `step`:
        batch i belongs to the pipeline's epoch i // steps_per_epoch."""
        return self.start_epoch * self.steps_per_epoch + step - self.start_step

    def replanned(self, step: int, steps_per_epoch: int) -> EpochPlan:
        """The plan from `step` on, with epochs of `steps_per_epoch` steps: the epoch in
        progress keeps the steps it has done (at most one fewer than the new length)."""
        epoch = self.epoch_of(step)
        done = step - (self.epoch_end(epoch) - self.steps_per_epoch)
        return EpochPlan(steps_per_epoch, step - min(done, steps_per_epoch - 1), epoch)

    def to_json(self) -> dict[str, int]:
        """The part config.json records besides `steps_per_epoch`."""
        return {"start_step": self.start_step, "start_epoch": self.start_epoch}

    @classmethod
    def stored(cls, config_json: dict[str, Any], steps_per_epoch: int) -> EpochPlan:
        """The plan of a stored run (runs before plans were recorded: (n, 0, 0))."""
        anchor = config_json.get("epoch_plan") or {}
        return cls(
            int(config_json.get("steps_per_epoch") or steps_per_epoch),
            int(anchor.get("start_step", 0)),
            int(anchor.get("start_epoch", 0)),
        )


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything resolved from the config and the data before the first step."""

    config: TrainConfig
    dataset: data.Dataset
    network: Network
    shapes: dict[str, Any]  # every variable collection's shapes, from one abstract init
    params: int
    workdir: Path
    batch_size: int
    batch_size_chosen: bool  # True when the batch was chosen for the data, not given
    plan: EpochPlan
    optimizer: optim.OptimizerSettings
    best_by: str  # what chooses the best checkpoint: one of BEST_BY

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.optimizer.total_steps

    def with_plan(self, plan: EpochPlan) -> Setup:
        """This setup with another epoch plan (and the schedule's length to match)."""
        total = plan.total_steps(self.config.epochs)
        return dataclasses.replace(
            self, plan=plan, optimizer=dataclasses.replace(self.optimizer, total_steps=total)
        )

    @property
    def checkpoint_every(self) -> int:
        return self.config.checkpoint_every or self.steps_per_epoch

    def checkpoint_due(self, step: int) -> bool:
        """Whether a checkpoint is written at `step` (the last step and stops aside): every
        --checkpoint-every steps, or else at each epoch's end."""
        if self.config.checkpoint_every:
            return step % self.config.checkpoint_every == 0
        return (step - self.plan.start_step) % self.steps_per_epoch == 0

    def meta(self) -> dict[str, Any]:
        """What a checkpoint records: the network, the data it classifies, and how an image
        becomes its input (`flaxcnn.predict` reads it: centre square, resize, normalise)."""
        net = self.network
        mean, std = normalization(self.dataset.info, net.in_channels)
        return {
            **net.meta(),
            "class_names": [str(c) for c in self.dataset.info.class_names],
            "dataset": self.config.dataset,
            "preprocessing": {
                "resize": net.image_size,
                "crop": net.image_size,
                "mean": [float(m) for m in mean],
                "std": [float(s) for s in std],
            },
        }


def default_batch_size(num_train: int, devices: int) -> int:
    """128, halved while an epoch would have fewer than MIN_STEPS_PER_EPOCH steps (not below
    MIN_DEFAULT_BATCH), rounded down to a multiple of the device count."""
    batch = DEFAULT_BATCH_SIZE
    while batch > MIN_DEFAULT_BATCH and num_train // batch < MIN_STEPS_PER_EPOCH:
        batch //= 2
    return max(devices, batch - batch % devices)


def default_workdir(config: TrainConfig) -> Path:
    dataset = config.dataset.split(":", 1)[0] if ":" in config.dataset else config.dataset
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.arch}-{dataset}-{stamp}"


def get_spec(arch: str) -> models.ModelSpec:
    try:
        return models.get_spec(arch)
    except ValueError as e:
        raise UsageError(str(e)) from None


def canonical_dataset(name: str) -> str:
    """`folder:PATH` with PATH absolute, so that a run can be resumed or evaluated from any
    directory; other names as given."""
    if isinstance(name, str) and name.startswith(FOLDER) and len(name) > len(FOLDER):
        return FOLDER + str(Path(name[len(FOLDER) :]).expanduser().resolve())
    return name


def check_workdir_outside_data(config: TrainConfig) -> None:
    """A workdir inside a folder data set would be read back as a class (its checkpoints as
    images): UsageError."""
    if not (config.workdir and config.dataset.startswith(FOLDER)):
        return
    root = Path(config.dataset[len(FOLDER) :])
    workdir = Path(config.workdir).expanduser().resolve()
    if workdir == root or root in workdir.parents:
        raise UsageError(
            f"--workdir {config.workdir} is inside the data folder {root}, where its files "
            "would be read as a class of images; choose a --workdir outside it"
        )


def model_options(config: TrainConfig, automatic: dict[str, Any]) -> dict[str, Any]:
    """The options the network is built with: the input's automatic ones (small stem), then
    --dropout, then the user's --model-option values, which win."""
    try:
        given = parse_options(config.arch, config.model_options or {})
    except ValueError as e:
        raise UsageError(str(e)) from None
    options = dict(automatic)
    if config.dropout is not None:
        if "dropout_rate" not in models.options(config.arch):
            raise UsageError(f"{config.arch} has no dropout; leave out --dropout")
        if given.get("dropout_rate", config.dropout) != config.dropout:
            raise UsageError("--dropout and --model-option dropout_rate disagree; give one")
        options["dropout_rate"] = config.dropout
    options.update(given)
    return options


def prepare(config: TrainConfig, stored: dict[str, Any] | None = None) -> Setup:
    """Validate everything that can be validated before touching the workdir.

    `stored` is the config.json of the run being resumed: its epoch plan is kept."""
    config.validate()
    config = dataclasses.replace(config, dataset=canonical_dataset(config.dataset))
    check_workdir_outside_data(config)
    spec = get_spec(config.arch)
    model_options(config, {})  # a bad option is reported before the data are read
    try:
        dataset = data.load(
            config.dataset, data_dir=config.data_dir, skip_corrupt=config.skip_corrupt
        )
        dataset = data.hold_out(dataset, config.val_fraction)
    except ValueError as e:  # DatasetNotPrepared is a ValueError too
        raise UsageError(str(e)) from None
    small = dataset.info.num_train < SMALL_SPLIT
    config = dataclasses.replace(
        config, augment=resolve_augment(config.augment, dataset.info.hflip, small_split=small)
    )
    # A data set of images of varying sizes records 0: the model's design size then.
    native = max(dataset.info.image_shape[:2]) or spec.input_size
    image_size, automatic = models.resolve_input(spec, native, config.image_size)
    network = Network(
        arch=config.arch,
        num_classes=dataset.info.num_classes,
        image_size=image_size,
        in_channels=spec.in_channels,
        dtype=config.dtype,
        options=model_options(config, automatic),
    )
    try:  # abstract evaluation: the models check their input size here, in a second
        shapes = summary.init_shapes(network.create(), network.input_shape())
    except ValueError as e:
        raise UsageError(str(e)) from None
    params = summary.tree_size(shapes["params"])

    devices, num_train = jax.device_count(), dataset.info.num_train
    batch_size = config.batch_size or default_batch_size(num_train, devices)
    if batch_size % devices:
        raise UsageError(f"--batch-size {batch_size} does not divide evenly over {devices} devices")
    if batch_size > num_train:
        if config.batch_size is not None:
            raise UsageError(
                f"--batch-size {batch_size} is larger than the training split ({num_train})"
            )
        raise UsageError(
            f"the training split of {config.dataset} has {num_train} images, fewer than the "
            f"{devices} devices: give it more images"
        )
    # Refuse what cannot fit before anything is built (an --image-size of 100000 would
    # otherwise hang allocating a network of a trillion parameters).
    memory.check_fits(
        network, batch_size // devices, config.optimizer, params, strategy=config.parallel
    )
    if jax.process_count() > 1 and config.workdir is None:
        raise UsageError("with several processes, give every process the same --workdir")
    steps_per_epoch = num_train // batch_size
    # A resumed run keeps its plan (when its data changed size, `Trainer` re-plans from
    # the step it reached).
    anchor = EpochPlan.stored(stored, steps_per_epoch).to_json() if stored else {}
    plan = EpochPlan(steps_per_epoch, **anchor)
    return Setup(
        config=config,
        dataset=dataset,
        network=network,
        shapes=shapes,
        params=params,
        workdir=Path(config.workdir) if config.workdir else default_workdir(config),
        batch_size=batch_size,
        batch_size_chosen=config.batch_size is None,
        plan=plan,
        best_by=choose_best_by(dataset.info, stored),
        optimizer=optim.OptimizerSettings.from_config(
            config,
            batch_size=batch_size,
            total_steps=plan.total_steps(config.epochs),
            warmup_steps=round(config.warmup_epochs * steps_per_epoch),
            lr_min_batch=lr_min_batch(stored),
        ),
    )


def lr_min_batch(stored: dict[str, Any] | None) -> int:
    """The batch below which the learning rate stops shrinking: optim.LR_MIN_BATCH, or 1
    (linear all the way down) for a run from before the floor, which resumes as it ran."""
    if stored is not None and "lr_min_batch" not in stored:
        return 1
    return optim.LR_MIN_BATCH


# What chooses a run's best checkpoint (config.json's "best_checkpoint_by").
BEST_BY = ("val_accuracy", "latest", "test_accuracy")


def choose_best_by(info: data.DatasetInfo, stored: dict[str, Any] | None) -> str:
    """Validation accuracy where the run has a validation split; else (--val-fraction 0)
    nothing: the best checkpoint is the latest, so that the test split chooses nothing. A
    run from before validation splits (its config.json does not say) chose on test
    accuracy and goes on doing so."""
    if stored is not None and "best_checkpoint_by" not in stored:
        return "test_accuracy"
    return "val_accuracy" if info.num_val else "latest"


def resolved_config(setup: Setup, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """`config.json`: every setting as used, defaults resolved, and how they were chosen.

    A resumed run passes the `previous` config.json: its history (one entry per resume,
    with the settings that changed) and how the batch was chosen carry over.
    """
    c = setup.config
    data_dir = Path(c.data_dir).expanduser() if c.data_dir else data.default_data_dir()
    resolved = dataclasses.replace(
        c,
        workdir=str(setup.workdir),
        data_dir=str(data_dir.absolute()),
        image_size=setup.network.image_size,
        batch_size=setup.batch_size,
        lr=c.lr if c.lr is not None else optim.DEFAULT_LR[c.optimizer],
        weight_decay=setup.optimizer.weight_decay,
        model_options=setup.network.options,
        resume=None,  # each start decides these anew
        accept_new_data=False,
    )
    previous = previous or {}
    return {
        **resolved.to_json(),
        "batch_size_chosen": previous.get("batch_size_chosen", setup.batch_size_chosen),
        "peak_lr": setup.optimizer.peak_lr,
        "lr_min_batch": setup.optimizer.lr_min_batch,
        "steps_per_epoch": setup.steps_per_epoch,
        "epoch_plan": setup.plan.to_json(),
        "checkpoint_every_steps": setup.checkpoint_every,
        "total_steps": setup.total_steps,
        "data": resume.data_signature(setup.dataset.info),
        "best_checkpoint_by": setup.best_by,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "jax_version": jax.__version__,
        "history": list(previous.get("history", [])),
    }
