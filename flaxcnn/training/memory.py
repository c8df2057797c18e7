"""How much memory a training configuration needs, estimated before anything is built.

A configuration that cannot fit (say `--image-size 100000`) would otherwise build a huge
network and then swap, hang or die in the allocator with no message. The estimate is
abstract: one `jax.eval_shape` of the initialiser and one `jax.make_jaxpr` of the forward
pass under `jax.vjp` trace shapes only, so it takes a second or two whatever the size.

What a train step holds, as the trainer runs it (`training.loop`, `training.parallel`):

* the state (parameters and optimizer slots, float32) several times: the trainer's
  initial copy, kept while it trains, the step's input and the step's output, which is a
  separate buffer unless the strategy donates the input (`shard_map` always, `pmap` only
  off the CPU); plus one gradient per parameter;
* activations: what the backward pass keeps, counted as the bytes of the residuals that
  `jax.vjp` saves from each image (XLA keeps a part of them and adds transients: a
  measured factor per model family, `ACTIVATION_FACTOR`);
* on the CPU, what compiling and running the steps costs in host memory (XLA's compiler
  and runtime), which grows with the size of the program: `CPU_OVERHEAD_*`.

The constants were fitted to peaks measured with `python -m flaxcnn.bench.memory` (a
fresh process per configuration, the trainer's state, step and optimizer, XLA:CPU); the
README's "Memory" section holds the table. The check compares the estimate with the memory available
now (MemAvailable, and a container's limit less its usage), not with the total RAM.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from flaxcnn import models
from flaxcnn.cli import UsageError
from flaxcnn.training import parallel, steps
from flaxcnn.training.build import Network

# Float32 slots each optimizer keeps per parameter (see `flaxcnn.training.optim`).
OPTIMIZER_SLOTS = {"sgd": 1, "adamw": 2}  # Nesterov momentum; Adam's two moments
PARAM_BYTES = 4  # parameters, gradients and optimizer slots are float32 in every dtype

# The part of `jax.vjp`'s per-image residuals that XLA:CPU holds at a step's peak, with
# the backward pass's transients, by model family (fitted, see the module docstring).
# Where two batch sizes were measured, the factor is at least the measured growth per
# image over the residuals per image: ResNet-50 1.01, ResNet-20 1.02, GoogLeNet 2.48;
# LeNet-5's, whose residuals are tiny beside XLA's buffers, measured 7.3 and 4.4 in two
# runs. 0.5 is the least the fit was allowed: AlexNet's and NetResDeep's peaks are
# mostly their state and the compiler's.
ACTIVATION_FACTOR = {
    "alexnet": 0.5,
    "inception": 2.5,
    "lenet": 4.5,
    "netresdeep": 0.6,
    "plain_cifar": 1.05,  # resnet_cifar without its shortcuts
    "resnet": 1.4,
    "resnet_cifar": 1.05,
    "simple": 1.5,
    "vgg": 2.8,
}
DEFAULT_ACTIVATION_FACTOR = 2.8  # a family not measured: the largest but LeNet's
# Host memory that XLA:CPU's compiler and runtime keep once the steps have compiled and
# run: a fixed part, and a part per kernel (an operation of the forward pass with its
# shapes: ResNet-56 repeats 84 of them, GoogLeNet has 610). Fitted.
CPU_OVERHEAD_BYTES = 140 * 2**20
CPU_OVERHEAD_PER_KERNEL_BYTES = 2.2 * 2**20

GIB = 2**30
_UNITS = (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10))
MEMINFO = Path("/proc/meminfo")
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
_NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as a number near 2**63


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one device needs for a training step, by what they hold.

    `copies` are the state's other copies (initial, step output); `overhead` is the
    compiler's and runtime's host memory (CPU only), shared out over the devices that
    share that memory, as the process-wide initial copy is.
    """

    params: int
    optimizer: int
    gradients: int
    activations: int
    copies: int = 0
    overhead: int = 0

    @property
    def total(self) -> int:
        return (
            self.params
            + self.optimizer
            + self.gradients
            + self.activations
            + self.copies
            + self.overhead
        )

    def describe(self) -> str:
        """E.g. "1.2 GiB (parameters 45 MiB, optimizer 45 MiB, ...)"."""
        parts = ", ".join(
            f"{name} {format_bytes(getattr(self, field))}"
            for name, field in (
                ("parameters", "params"),
                ("optimizer", "optimizer"),
                ("gradients", "gradients"),
                ("activations", "activations"),
                ("state copies", "copies"),
                ("compiler and runtime", "overhead"),
            )
            if field not in ("copies", "overhead") or getattr(self, field)
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


@dataclasses.dataclass(frozen=True)
class Trace:
    """What the estimate reads from an abstract trace of the network, for one image."""

    params: int  # trainable parameters
    residual_bytes: int  # what `jax.vjp` saves from one image for the backward pass
    kernels: int  # different operations (primitive and input shapes) of the forward pass


def _nbytes(aval: Any) -> int:
    return math.prod(aval.shape) * jnp.dtype(aval.dtype).itemsize


def trace(network: Network, dtype: str | None = None) -> Trace:
    """Abstract init and forward-with-vjp of `network` on one image, in train mode (so
    that train-only branches such as GoogLeNet's auxiliary heads count).

    A residual counts for the image when it is computed from it (the weights, which the
    backward pass keeps too, are counted as parameters). A scanned stage is traced
    unscanned: the same layers, counted once each. `dtype` overrides the compute dtype.
    Remembered per network: the trainer's check and the benchmark's ask more than once.
    """
    options = dict(network.options)
    if options.get("scan_blocks"):
        options["scan_blocks"] = False
    network = dataclasses.replace(network, options=options, dtype=dtype or network.dtype)
    key = json.dumps(network.meta(), sort_keys=True, default=repr)
    if key not in _TRACES:
        if len(_TRACES) >= 32:
            _TRACES.clear()
        _TRACES[key] = _trace(network)
    return _TRACES[key]


_TRACES: dict[str, Trace] = {}


def _trace(network: Network) -> Trace:
    model = network.create(None)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    image = jax.ShapeDtypeStruct(network.input_shape(1), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(rngs, x, train=True), image)
    batch_stats = variables.get("batch_stats", {})

    def residuals(params, batch_stats, image):
        def loss(params):
            outputs, _ = model.apply(
                {"params": params, "batch_stats": batch_stats},
                image,
                train=True,
                rngs={"dropout": rngs["dropout"]},
                mutable=["batch_stats"],
            )
            logits, aux = steps.split_outputs(outputs)
            return sum(jnp.sum(x.astype(jnp.float32)) for x in (logits, *aux))

        return jax.vjp(loss, params)[1]

    jaxpr = jax.make_jaxpr(residuals)(variables["params"], batch_stats, image).jaxpr
    from_image = {jaxpr.invars[-1]}
    for eqn in jaxpr.eqns:
        if any(isinstance(v, jax_core.Var) and v in from_image for v in eqn.invars):
            from_image.update(eqn.outvars)
    saved = {v for v in jaxpr.outvars if isinstance(v, jax_core.Var) and v in from_image}
    return Trace(
        params=sum(math.prod(p.shape) for p in jax.tree.leaves(variables["params"])),
        residual_bytes=sum(_nbytes(v.aval) for v in saved),
        kernels=len({_signature(eqn) for eqn in jaxpr.eqns}),
    )


def _signature(eqn: Any) -> tuple:
    shapes = tuple(tuple(getattr(v.aval, "shape", ())) for v in eqn.invars)
    return eqn.primitive.name, shapes


def _state_copies(platform: str, strategy: str) -> int:
    """Copies of the state beside the step's input: the trainer's initial state, and the
    step's output unless the input is donated to it (see `parallel.PmapParallel`)."""
    donated = strategy == "shard_map" or platform != "cpu"
    return 1 if donated else 2


def estimate(
    network: Network,
    batch_per_device: int,
    optimizer: str,
    params: int | None = None,
    *,
    strategy: str = "pmap",
    platform: str | None = None,
    devices: int | None = None,
) -> MemoryEstimate:
    """What one device holds during a training step with `batch_per_device` images.

    `params` (trainable parameters) is the trace's count unless the caller has it already.
    `platform` and `devices` (how many local devices share the memory) default to JAX's
    default backend and its local devices.
    """
    if optimizer not in OPTIMIZER_SLOTS:
        raise ValueError(
            f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZER_SLOTS)}"
        )
    if strategy not in parallel.STRATEGIES:
        raise ValueError(
            f"unknown parallel strategy {strategy!r}; choose from {', '.join(parallel.STRATEGIES)}"
        )
    platform = platform or jax.default_backend()
    cpu = platform == "cpu"
    devices = devices or (jax.local_device_count() if cpu else 1)
    # Measured on XLA:CPU, a bfloat16 step holds as much as a float32 one (ResNet-18 at
    # 128x128, batch 64: XLA's temporary buffers 580 vs 571 MiB, peaks 1388 vs 1372 MiB).
    traced = trace(network, "float32" if cpu else None)
    count = traced.params if params is None else params
    param_bytes = count * PARAM_BYTES
    optimizer_bytes = OPTIMIZER_SLOTS[optimizer] * param_bytes
    state = param_bytes + optimizer_bytes  # BatchNorm's statistics are too few to count
    family = models.get_spec(network.arch).family
    factor = ACTIVATION_FACTOR.get(family, DEFAULT_ACTIVATION_FACTOR)
    activations = math.ceil(factor * traced.residual_bytes) * batch_per_device
    # The initial state is one per process (shared out over its devices); the step's
    # output copy is one per device.
    extra = _state_copies(platform, strategy)
    copies = state / devices + (extra - 1) * state
    overhead = 0
    if cpu:
        kernels = traced.kernels * CPU_OVERHEAD_PER_KERNEL_BYTES
        overhead = (CPU_OVERHEAD_BYTES + kernels) / devices
    return MemoryEstimate(
        params=param_bytes,
        optimizer=optimizer_bytes,
        gradients=param_bytes,
        activations=activations,
        copies=math.ceil(copies),
        overhead=math.ceil(overhead),
    )


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def meminfo_available(path: Path = MEMINFO) -> int | None:
    """MemAvailable of /proc/meminfo (what the kernel can give without swapping), bytes."""
    text = _read(path)
    for line in (text or "").splitlines():
        name, _, value = line.partition(":")
        fields = value.split()
        if name == "MemAvailable" and fields and fields[0].isdigit():
            unit = fields[1].lower() if len(fields) > 1 else ""
            return int(fields[0]) * (1024 if unit == "kb" else 1)
    return None


def _number(path: Path) -> int | None:
    text = (_read(path) or "").strip()
    return int(text) if text.isdigit() else None


def _stat(path: Path, key: str) -> int:
    for line in (_read(path) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value.strip())
    return 0


def _headroom(limit: int | None, usage: int | None, stat: Path, inactive: str) -> int | None:
    """A cgroup's limit less its usage; inactive file cache counts as free (the kernel
    reclaims it before it refuses), as in `docker stats` and the kubelet's working set."""
    if limit is None or usage is None or limit >= _NO_LIMIT:
        return None
    return max(limit - max(usage - _stat(stat, inactive), 0), 0)


def cgroup_available(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """The least headroom (limit less usage) of this process's memory cgroups, bytes;
    None where no limit is set. cgroup v2: the process's group and every group above it;
    v1: the memory controller's group (or its root, as a container sees it)."""
    groups: list[str] = [""]
    v1: list[str] = [""]
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        group = Path(path.strip().lstrip("/"))
        if controllers == "":  # v2: the group and those above it
            groups = [str(p) for p in (group, *group.parents)]
        elif "memory" in controllers.split(","):
            v1 = [str(group), "."]
    found = []
    for group in dict.fromkeys(groups):
        directory = root / group
        limit = _number(directory / "memory.max")
        usage = _number(directory / "memory.current")
        room = _headroom(limit, usage, directory / "memory.stat", "inactive_file")
        if room is not None:
            found.append(room)
    for group in dict.fromkeys(v1):
        directory = root / "memory" / group
        limit = _number(directory / "memory.limit_in_bytes")
        usage = _number(directory / "memory.usage_in_bytes")
        room = _headroom(limit, usage, directory / "memory.stat", "total_inactive_file")
        if room is not None:
            found.append(room)
    return min(found) if found else None


def host_available() -> tuple[int, str]:
    """Host memory available now and where the figure comes from, e.g. "MemAvailable".

    The smaller of the kernel's MemAvailable and a container's headroom; where neither
    can be read (no /proc: macOS), the physical memory in all, said so.
    """
    meminfo, cgroup = meminfo_available(), cgroup_available()
    if cgroup is not None and (meminfo is None or cgroup < meminfo):
        return cgroup, "container limit less its usage"
    if meminfo is not None:
        return meminfo, "MemAvailable"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total, "RAM in all: what is free is unknown here"


def available_bytes() -> tuple[int, str]:
    """Memory one local device can have now, and where the figure comes from, as in
    "the 3.1 GiB available to this cpu device (MemAvailable)".

    Accelerators report what XLA may still allocate (`bytes_limit` less `bytes_in_use`).
    CPU devices share the host's available memory, so with several of them (e.g.
    `--xla_force_host_platform_device_count`) each gets its share.
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
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return free, f"{device.platform} device"
    host, source = host_available()
    if device.platform != "cpu":
        return host, f"{device.platform} device (its size unknown: the host's {source})"
    shared = [d for d in devices if d.platform == device.platform]
    if len(shared) > 1:
        return host // len(shared), (
            f"cpu device (1/{len(shared)} of the host's {format_bytes(host)}: {source})"
        )
    return host, f"cpu device ({source})"


def check_fits(
    network: Network,
    batch_per_device: int,
    optimizer: str,
    params: int | None = None,
    *,
    strategy: str = "pmap",
) -> MemoryEstimate:
    """The estimate, or a one-line `UsageError` when it exceeds what one device has
    available now."""
    needed = estimate(network, batch_per_device, optimizer, params, strategy=strategy)
    limit, device = available_bytes()
    if needed.total > limit:
        size = network.image_size
        images = "image" if batch_per_device == 1 else "images"
        raise UsageError(
            f"{network.arch} at {size}x{size} with {batch_per_device} {images} per device"
            f" needs about {needed.describe()}, more than the {format_bytes(limit)} available"
            f" to this {device}: lower --image-size or --batch-size"
        )
    return needed
