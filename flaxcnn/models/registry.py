"""The model registry: a name is all a user needs to build a network.

Each family module registers its variants with `register`, together with the input the
network was designed for, so that tools (summary, tests, the trainer) need no per-model code.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

SMALL_INPUT_MAX = 64  # at or below this side, use a model's small-input stem if it has one


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one architecture.

    `input_size`/`in_channels`/`num_classes` are the design point (e.g. 224x224x3 and 1000
    classes for ImageNet networks). `min_size` is the smallest square input that works.
    `small_input_options` are the options that adapt the network to 32x32-class images
    (e.g. ResNet's small stem). `classifier` names the top-level modules that end in class
    scores (the main head, and auxiliary heads where the network has them): the last dense
    layer of each is what `--freeze-backbone` trains.
    """

    name: str
    builder: Callable[..., nn.Module]
    family: str
    input_size: int
    in_channels: int = 3
    num_classes: int = 1000
    min_size: int = 1
    small_input_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    classifier: tuple[str, ...] = ("fc",)
    description: str = ""


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def names() -> list[str]:
    """Every registered architecture, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The spec for `name`; an unknown name raises ValueError naming the close matches."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, names(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown architecture {name!r}.{hint} Known: {', '.join(names())}"
        ) from None


def _module_fields(builder: Callable[..., nn.Module]) -> dict[str, dataclasses.Field]:
    cls = builder.func if isinstance(builder, functools.partial) else builder
    fixed = builder.keywords if isinstance(builder, functools.partial) else {}
    return {
        f.name: f
        for f in dataclasses.fields(cls)
        if f.init and f.name not in ("parent", "name") and f.name not in fixed
    }


def resolve_input(
    spec: ModelSpec, native: int, requested: int | None
) -> tuple[int, dict[str, Any]]:
    """The input side and the model options for it, for images `native` pixels a side.

    By default the images' own size, raised to what the model needs; images of at most
    SMALL_INPUT_MAX pixels use the model's small-input stem (e.g. ResNet's 3x3 stride-1 stem
    without max-pool), which keeps 32x32-class images from being downsampled to nothing.
    Here rather than in the trainer so that the summary and the benchmark build the same
    network that training does.
    """
    size = requested or native
    small = bool(spec.small_input_options) and size <= SMALL_INPUT_MAX < spec.input_size
    if requested is None and not small:
        # Networks designed for small images (LeNet's 32x32) get their design size; the
        # others the smallest size they accept (VGG: 32, AlexNet: 63), not 224.
        design = spec.input_size if spec.input_size <= SMALL_INPUT_MAX else spec.min_size
        size = max(size, design)
    return size, dict(spec.small_input_options) if small else {}


def options(name: str) -> dict[str, Any]:
    """The options `create(name, ...)` accepts, with their defaults."""
    fields = _module_fields(get_spec(name).builder)
    out = {}
    for key, f in fields.items():
        if f.default is not dataclasses.MISSING:
            out[key] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[key] = f.default_factory()
        else:
            out[key] = None
    return out


def create(
    name: str,
    *,
    num_classes: int | None = None,
    dtype: Any = jnp.float32,
    axis_name: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the Flax module registered as `name`.

    `num_classes` defaults to the network's design point; `dtype` is the compute dtype,
    a jnp type or its name ("float32", "bfloat16"), while parameters stay float32;
    `axis_name` is the data-parallel axis over which BatchNorm averages its statistics
    (ignored by networks without BatchNorm). Other keyword options are the module's own
    fields (see `options(name)`); an unknown one raises ValueError.
    """
    spec = get_spec(name)
    fields = _module_fields(spec.builder)
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(
            f"{name} has no option {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(sorted(set(fields) - {'num_classes', 'dtype'}))}"
        )
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    kwargs["num_classes"] = spec.num_classes if num_classes is None else num_classes
    try:
        kwargs["dtype"] = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"unknown dtype {dtype!r}") from None
    if "axis_name" in fields:
        kwargs["axis_name"] = axis_name
    return spec.builder(**kwargs)
