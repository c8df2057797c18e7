"""How much memory a training configuration needs, estimated before anything is built.

A configuration that cannot fit (say `--image-size 100000`) would otherwise build a huge
network and then hang or die in the allocator with no message. The estimate comes from an
abstract evaluation (`jax.eval_shape`): only shapes are traced, nothing is allocated or
compiled, so it takes seconds whatever the image size.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxcnn.cli import UsageError
from flaxcnn.models import summary
from flaxcnn.training.build import Network

# Float32 slots each optimizer keeps per parameter (see `flaxcnn.training.optim`).
OPTIMIZER_SLOTS = {"sgd": 1, "adamw": 2}  # Nesterov momentum; Adam's two moments
PARAM_BYTES = 4  # parameters, gradients and optimizer slots are float32 in every dtype
# What the backward pass keeps besides the layer outputs (inputs of activations, masks,
# BatchNorm's normalised values, the gradients flowing back): a rough upper bound,
# not XLA's exact figure, which depends on fusion and rematerialisation.
BACKWARD_FACTOR = 2

GIB = 2**30
_UNITS = (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10))
_CGROUP_LIMITS = (
    "/sys/fs/cgroup/memory.max",  # cgroup v2
    "/sys/fs/cgroup/memory/memory.limit_in_bytes",  # cgroup v1
)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one device needs for a training step, by what they hold."""

    params: int
    optimizer: int
    gradients: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.gradients + self.activations

    def describe(self) -> str:
        """E.g. "1.2 GiB (parameters 45 MiB, optimizer 45 MiB, ...)"."""
        parts = ", ".join(
            f"{name} {format_bytes(getattr(self, field))}"
            for name, field in (
                ("parameters", "params"),
                ("optimizer", "optimizer"),
                ("gradients", "gradients"),
                ("activations", "activations"),
            )
        )
        return f"{format_bytes(self.total)} ({parts})"


def format_bytes(n: int) -> str:
    """Binary units with two or three significant digits; exponents past 9999 GiB."""
    units = [(name, size) for name, size in _UNITS if n >= size]
    if not units:
        return f"{n} B"
    unit, size = units[0]
    value = n / size
    if value >= 10_000:
        return f"{value:.1e} {unit}"
    if value >= 100:
        return f"{value:.0f} {unit}"
    return f"{value:.1f} {unit}"


def _layer_outputs(network: Network) -> tuple[int, int]:
    """(elements of all innermost layers' outputs for one image, trainable parameters).

    One abstract `init` in train mode, so that train-only branches (GoogLeNet's auxiliary
    heads) count, with every module call intercepted to record its output shape.
    """
    options = dict(network.options)
    # A scanned stage traces its block once, so its layers would be seen once instead of
    # once per block; the unscanned network has the same activations and parameters.
    if options.get("scan_blocks"):
        options["scan_blocks"] = False
    model = dataclasses.replace(network, options=options).create(None)

    outputs: list[tuple[tuple[str, ...], int]] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            size = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(out))
            outputs.append((tuple(context.module.path), size))
        return out

    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    image = jax.ShapeDtypeStruct(network.input_shape(1), jnp.float32)
    with nn.intercept_methods(record):
        variables = jax.eval_shape(lambda x: model.init(rngs, x, train=True), image)

    paths = {path for path, _ in outputs}
    parents = {path[:i] for path in paths for i in range(len(path))}
    elements = sum(size for path, size in outputs if path and path not in parents)
    return elements, summary.tree_size(variables["params"])


def estimate(
    network: Network, batch_per_device: int, optimizer: str, params: int | None = None
) -> MemoryEstimate:
    """What one device holds during a training step with `batch_per_device` images.

    `params` is the trainable parameter count when the caller already has it.
    """
    if optimizer not in OPTIMIZER_SLOTS:
        raise ValueError(
            f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZER_SLOTS)}"
        )
    elements, counted = _layer_outputs(network)
    params = counted if params is None else params
    param_bytes = params * PARAM_BYTES
    itemsize = jnp.dtype(network.dtype).itemsize
    return MemoryEstimate(
        params=param_bytes,
        optimizer=OPTIMIZER_SLOTS[optimizer] * param_bytes,
        gradients=param_bytes,
        activations=elements * batch_per_device * itemsize * BACKWARD_FACTOR,
    )


def _host_memory() -> tuple[int, bool]:
    """Physical memory, lowered to the container's cgroup limit; (bytes, whether limited)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_LIMITS:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:  # "max" (v2) or a huge number (v1)
            return int(text), True
        break
    return total, False


def available_bytes() -> tuple[int, str]:
    """Memory of one local device and a short description of it, e.g. "cpu device".

    Accelerators report what XLA may allocate (`bytes_limit`). CPU devices share the
    host's memory, so with several of them (e.g. `--xla_force_host_platform_device_count`)
    each gets its share, since every one holds its own copy of the state and its batch.
    """
    devices = jax.local_devices()
    device = devices[0]
    stats: dict[str, Any] | None = None
    if device.platform != "cpu":
        try:
            stats = device.memory_stats()
        except Exception:  # some backends do not implement it
            stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.platform} device"
    host, limited = _host_memory()
    shared = [d for d in devices if d.platform == device.platform]
    source = "container limit" if limited else "RAM"
    if device.platform != "cpu":
        return host, f"{device.platform} device (size unknown: host {source})"
    if len(shared) > 1:
        return host // len(shared), f"cpu device (1/{len(shared)} of {format_bytes(host)} {source})"
    return host, "cpu device" if not limited else "cpu device (container limit)"


def check_fits(
    network: Network, batch_per_device: int, optimizer: str, params: int | None = None
) -> MemoryEstimate:
    """The estimate, or a one-line `UsageError` when it exceeds one device's memory."""
    needed = estimate(network, batch_per_device, optimizer, params)
    limit, device = available_bytes()
    if needed.total > limit:
        size = network.image_size
        images = "image" if batch_per_device == 1 else "images"
        raise UsageError(
            f"{network.arch} at {size}x{size} with {batch_per_device} {images} per device"
            f" needs about {needed.describe()}, more than the {format_bytes(limit)} of this"
            f" {device}: lower --image-size or --batch-size"
        )
    return needed
