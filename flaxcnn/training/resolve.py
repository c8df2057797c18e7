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
from flaxcnn.data.transforms import normalization
from flaxcnn.models import summary
from flaxcnn.models.parsing import parse_options
from flaxcnn.training import memory, optim, resume
from flaxcnn.training.build import Network
from flaxcnn.training.config import TrainConfig

DEFAULT_BATCH_SIZE = 128
FOLDER = "folder:"
MIN_STEPS_PER_EPOCH = 10  # the default batch halves until an epoch has this many steps...
MIN_DEFAULT_BATCH = 8  # ...but not below this


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
    steps_per_epoch: int
    optimizer: optim.OptimizerSettings

    @property
    def total_steps(self) -> int:
        return self.optimizer.total_steps

    @property
    def checkpoint_every(self) -> int:
        return self.config.checkpoint_every or self.steps_per_epoch

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


def prepare(config: TrainConfig) -> Setup:
    """Validate everything that can be validated before touching the workdir."""
    config.validate()
    config = dataclasses.replace(config, dataset=canonical_dataset(config.dataset))
    check_workdir_outside_data(config)
    spec = get_spec(config.arch)
    model_options(config, {})  # a bad option is reported before the data are read
    try:
        dataset = data.load(
            config.dataset, data_dir=config.data_dir, skip_corrupt=config.skip_corrupt
        )
    except ValueError as e:  # DatasetNotPrepared is a ValueError too
        raise UsageError(str(e)) from None
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
    total_steps = steps_per_epoch * config.epochs
    return Setup(
        config=config,
        dataset=dataset,
        network=network,
        shapes=shapes,
        params=params,
        workdir=Path(config.workdir) if config.workdir else default_workdir(config),
        batch_size=batch_size,
        batch_size_chosen=config.batch_size is None,
        steps_per_epoch=steps_per_epoch,
        optimizer=optim.OptimizerSettings.from_config(
            config,
            batch_size=batch_size,
            total_steps=total_steps,
            warmup_steps=round(config.warmup_epochs * steps_per_epoch),
        ),
    )


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
        "steps_per_epoch": setup.steps_per_epoch,
        "checkpoint_every_steps": setup.checkpoint_every,
        "total_steps": setup.total_steps,
        "data": resume.data_signature(setup.dataset.info),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "jax_version": jax.__version__,
        "history": list(previous.get("history", [])),
    }
