"""Planning for `flaxcnn.bench`: every argument checked and resolved before anything compiles.

A `Plan` is one validated benchmark (the network as the trainer builds it, its batch,
parameters and multiply-adds); with it, the synthetic batch and the trainer's optimizer it
runs on. The reference (`torch_twins`) and the loop (`loop`) are imported here only when
asked for, so that torch stays optional and the trainer's loop is loaded only for --loop.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import numpy as np

from flaxcnn import cli, models
from flaxcnn.bench import twin_names
from flaxcnn.models import summary
from flaxcnn.training import memory, optim, parallel
from flaxcnn.training.build import Network
from flaxcnn.training.config import TrainConfig
from flaxcnn.training.resolve import get_spec

DTYPES = ("float32", "bfloat16")
STRATEGIES = parallel.STRATEGIES
SEED = 0
REFERENCES = ("torch",)
TORCH_MISSING = "torch and torchvision are not installed: pip install 'flaxcnn[torch]'"


@dataclasses.dataclass(frozen=True)
class Plan:
    """One validated benchmark: everything resolved, nothing compiled yet."""

    network: Network
    batch_size: int
    steps: int
    parallel: str
    params: int
    macs: int

    @property
    def arch(self) -> str:
        return self.network.arch


def plan(
    arch: str,
    *,
    image_size: int | None = None,
    batch_size: int = 128,
    steps: int = 10,
    dtype: str = "float32",
    parallel: str = "pmap",
    num_classes: int = 10,
) -> Plan:
    """Check every argument and resolve the input size; raises `cli.UsageError`.

    Without `image_size`, the model's design size; sizes of at most
    `models.SMALL_INPUT_MAX` on a network designed for larger ones use its small-input
    options (ResNet's small stem), exactly as the trainer chooses them.
    """
    for name, value in [
        ("image_size", image_size),
        ("batch_size", batch_size),
        ("steps", steps),
        ("num_classes", num_classes),
    ]:
        if value is not None and not (isinstance(value, int) and value > 0):
            raise cli.UsageError(
                f"--{name.replace('_', '-')} must be a positive integer, got {value}"
            )
    if dtype not in DTYPES:
        raise cli.UsageError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if parallel not in STRATEGIES:
        raise cli.UsageError(
            f"unknown parallel strategy {parallel!r}; choose from {', '.join(STRATEGIES)}"
        )
    spec = get_spec(arch)
    devices = jax.device_count()
    if batch_size % devices:
        raise cli.UsageError(
            f"--batch-size {batch_size} does not divide evenly over {devices} devices"
        )
    size, options = models.resolve_input(spec, spec.input_size, image_size)
    if not options and size < spec.min_size:
        raise cli.UsageError(f"{arch} needs --image-size of at least {spec.min_size}, got {size}")
    network = Network(
        arch=arch,
        num_classes=num_classes,
        image_size=size,
        in_channels=spec.in_channels,
        dtype=dtype,
        options=options,
    )
    model = network.create()
    try:  # abstract evaluation only: the models check their minimum input size here
        params = summary.count_params(model, network.input_shape())
        # What cannot fit is refused as the trainer refuses it, before any real work.
        memory.check_fits(
            network, batch_size // devices, TrainConfig().optimizer, params, strategy=parallel
        )
        macs = summary.total_macs(model, network.input_shape())
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    return Plan(network, batch_size, steps, parallel, params, macs)


def synthetic_batch(p: Plan, seed: int = SEED) -> dict[str, np.ndarray]:
    """This process's share of one global batch: normal images, uniform labels, all real."""
    rng = np.random.default_rng(seed)
    n = p.batch_size // jax.process_count()
    return {
        "image": rng.standard_normal(p.network.input_shape(n), dtype=np.float32),
        "label": rng.integers(0, p.network.num_classes, size=n, dtype=np.int32),
        "mask": np.ones(n, dtype=bool),
    }


def optimizer_settings(batch_size: int, total_steps: int) -> optim.OptimizerSettings:
    """The trainer's default optimizer, learning rate, schedule and weight decay."""
    return optim.OptimizerSettings.from_config(
        TrainConfig(),
        batch_size=batch_size,
        total_steps=total_steps,
        warmup_steps=1,  # the trainer warms up over an epoch; a step here
    )


def reference_module(name: str) -> ModuleType:
    """The reference's module (`torch_twins`), imported only when asked for.

    Raises `cli.UsageError` for an unknown reference or where torch is missing.
    """
    if name not in REFERENCES:
        raise cli.UsageError(f"unknown reference {name!r}; choose from {', '.join(REFERENCES)}")
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError:
        raise cli.UsageError(TORCH_MISSING) from None
    from flaxcnn.bench import torch_twins

    return torch_twins


def check_repeats(repeats: int) -> None:
    if not (isinstance(repeats, int) and repeats > 0):
        raise cli.UsageError(f"--repeats must be a positive integer, got {repeats}")


def check_reference(reference: str | None, plans: Sequence[Plan]) -> None:
    """The reference exists for every plan's network, with exactly its parameter count;
    a network without a twin is refused before the reference's framework is imported."""
    if reference is None:
        return
    for p in plans:
        twin_names.check_supported(p.network)
    module = reference_module(reference)
    for p in plans:
        module.check_twin(p.network, p.params)


def loop_module() -> ModuleType:
    """`loop`, imported when asked for: it loads the trainer (orbax, the data layer)."""
    from flaxcnn.bench import loop

    return loop


def prepare_job(
    arch: str,
    settings: dict[str, Any],
    reference: str | None = None,
    loop_root: Path | None = None,
    loop_epochs: int | None = None,
) -> tuple[Plan, Any]:
    """The validated plan of `arch`, and with `loop_root` the trainer's setup on the digits,
    whose input size and batch the plan then takes; raises `cli.UsageError`."""
    setup = None
    if loop_epochs is not None and loop_root is None:
        raise cli.UsageError("--loop-epochs goes with --loop")
    if loop_root is not None:
        loop = loop_module()
        epochs = loop.DEFAULT_EPOCHS if loop_epochs is None else loop_epochs
        loop_settings = {k: v for k, v in settings.items() if k != "steps"}
        setup = loop.setup(arch, loop_root, epochs=epochs, **loop_settings)
        settings = {**settings, "image_size": setup.network.image_size}
    p = plan(arch, **settings)
    if setup is not None:
        loop_module().check_same(setup, p.network, p.batch_size)
    check_reference(reference, [p])
    return p, setup


def check_writable(path: Path) -> None:
    """`--json PATH` can be written (checked before the benchmark runs, not after)."""
    parent = path.expanduser().absolute().parent
    if path.is_dir():
        raise cli.UsageError(f"--json {path} is a directory; name a file")
    if not parent.is_dir():
        raise cli.UsageError(f"--json {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise cli.UsageError(f"--json {path}: the directory {parent} is not writable")
