"""Residual networks (He et al. 2015, 2016) in torchvision's layout, plus the CIFAR ResNets.

A block learns a residual F(x) and outputs relu(F(x) + shortcut(x)): when F is zero the
block is (up to the ReLU) the identity, so adding blocks cannot make the network worse to
optimise, which is what lets 100+ layers train where a plain stack degrades.

Written as the Flax ImageNet example writes ResNet: blocks receive `conv`/`norm` partials,
and the variants are partials of one `ResNet`. Names follow torchvision's state_dict with a
Sequential index joined by "_" (`layer2.0.downsample.1.running_var` is
`layer2_0/downsample_1` in `batch_stats`, `var`), so converting weights is a renaming.

    ImageNet, 224x224 (torchvision)       | CIFAR, 32x32 (He et al. 2016, section 4.2)
    conv1 7x7/2, 64; max-pool 3x3/2       | conv1 3x3, 16
    layer1 x n1, 64 (x4 in bottlenecks)   | layer1 x n, 16   (32x32)
    layer2 x n2, 128, /2                  | layer2 x n, 32   (16x16), /2
    layer3 x n3, 256, /2                  | layer3 x n, 64   (8x8), /2
    layer4 x n4, 512, /2                  |
    global average pool, fc               | global average pool, fc
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxcnn.models import layers
from flaxcnn.models.layers import torch_padding
from flaxcnn.models.registry import ModelSpec, register

Array = jax.Array
ModuleDef = Any

# "A": identity, zero-padded channels and strided subsampling where the shape changes;
# "B": 1x1 conv + BatchNorm projection where the shape changes (torchvision), identity
# elsewhere; "none": no shortcut at all (the plain networks of the degradation experiment).
Shortcut = Literal["A", "B", "none"]


def _shortcut(
    x: Array, y: Array, strides: int, shortcut: Shortcut, conv: ModuleDef, norm: ModuleDef
) -> Array:
    """The block's output relu(y + shortcut(x)), where `y` is the residual branch F(x)."""
    if shortcut not in ("A", "B", "none"):
        raise ValueError(f"unknown shortcut {shortcut!r}; use 'A', 'B' or 'none'")
    if shortcut == "none":
        return nn.relu(y)
    features = y.shape[-1]
    if strides != 1 or x.shape[-1] != features:
        if shortcut == "B":
            x = conv(features, (1, 1), strides=(strides, strides), name="downsample_0")(x)
            x = norm(name="downsample_1")(x)
        else:  # "A": the new channels are extra zero entries
            x = x[:, ::strides, ::strides, :]
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, features - x.shape[-1])))
    return nn.relu(y + x)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34 and the CIFAR ResNets); stride on the first."""

    features: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    shortcut: Shortcut = "B"
    zero_init_last: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        s = (self.strides, self.strides)
        y = self.conv(self.features, (3, 3), strides=s, padding=torch_padding(1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), padding=torch_padding(1), name="conv2")(y)
        y = self.norm(name="bn2", scale_init=_last_scale_init(self.zero_init_last))(y)
        return _shortcut(x, y, self.strides, self.shortcut, self.conv, self.norm)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), with the stride on the 3x3 (torchvision's V1.5).

    The 1x1 convolutions make a deep block cheap: the 3x3 works on a quarter of the channels.
    """

    features: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    shortcut: Shortcut = "B"
    zero_init_last: bool = False

    expansion = 4  # output channels per `features`

    @nn.compact
    def __call__(self, x: Array) -> Array:
        s = (self.strides, self.strides)
        y = self.conv(self.features, (1, 1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), strides=s, padding=torch_padding(1), name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.features * self.expansion, (1, 1), name="conv3")(y)
        y = self.norm(name="bn3", scale_init=_last_scale_init(self.zero_init_last))(y)
        return _shortcut(x, y, self.strides, self.shortcut, self.conv, self.norm)


def _last_scale_init(zero: bool) -> Callable:
    # A zero scale on the block's last BatchNorm starts every block as the identity
    # (Goyal et al. 2017), torchvision's `zero_init_residual`.
    return nn.initializers.zeros if zero else nn.initializers.ones


class ResNet(nn.Module):
    """ResNet: a stem, then stages of residual blocks doubling width as they halve size.

    `small_stem` replaces the 7x7/2 conv and max-pool by one 3x3/1 conv for 32x32-class
    inputs. `scan_blocks` runs the identical blocks after the first of each stage as one
    `nn.scan` (parameters stacked under `layer{i}_rest`): the same function, traced once per
    stage instead of once per block, so compile time stops growing with depth;
    `to_scan_layout`/`from_scan_layout` move variables between the two layouts.
    """

    stage_sizes: Sequence[int]
    block: type[nn.Module]  # BasicBlock or Bottleneck
    num_classes: int = 1000
    num_filters: int = 64
    small_stem: bool = False
    shortcut: Shortcut = "B"
    zero_init_residual: bool = False
    scan_blocks: bool = False
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = jnp.asarray(x, self.dtype)
        conv = functools.partial(
            layers.Conv, use_bias=False, dtype=self.dtype, kernel_init=layers.kaiming_fan_out
        )
        norm = functools.partial(
            layers.batch_norm, train, axis_name=self.axis_name, dtype=self.dtype
        )
        if self.small_stem:
            x = conv(self.num_filters, (3, 3), padding=torch_padding(1), name="conv1")(x)
        else:
            x = conv(self.num_filters, (7, 7), (2, 2), padding=torch_padding(3), name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x))
        if not self.small_stem:
            x = layers.max_pool(x, 3, 2, padding=1)

        block = functools.partial(
            self.block,
            conv=conv,
            norm=norm,
            shortcut=self.shortcut,
            zero_init_last=self.zero_init_residual,
        )
        for i, n_blocks in enumerate(self.stage_sizes):
            features = self.num_filters * 2**i
            stage = f"layer{i + 1}"
            x = block(features, strides=1 if i == 0 else 2, name=f"{stage}_0")(x)
            if self.scan_blocks and n_blocks > 1:
                x = _scan_blocks(block(features, name=f"{stage}_rest"), x, n_blocks - 1)
            else:
                for j in range(1, n_blocks):
                    x = block(features, name=f"{stage}_{j}")(x)

        x = layers.global_avg_pool(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


def _scan_blocks(block: nn.Module, x: Array, length: int) -> Array:
    """Apply `length` copies of `block` in sequence, with per-copy parameters and statistics."""
    scan = nn.scan(
        lambda module, carry, _: (module(carry), None),
        variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True, "dropout": True},
        length=length,
    )
    x, _ = scan(block, x, None)
    return x


class CifarResNet(ResNet):
    """He et al. 2016, section 4.2: 6n+2 layers, 3x3 stem, stages of 16/32/64 channels.

    The paper's identity shortcuts with zero-padding (option A) are the default, so the
    shortcuts add no parameters; `shortcut="B"` projects where the shape changes.
    """

    num_classes: int = 10
    num_filters: int = 16
    small_stem: bool = True
    shortcut: Shortcut = "A"


_REST = re.compile(r"^(layer\d+)_rest$")
_BLOCK = re.compile(r"^(layer\d+)_(\d+)$")


def to_scan_layout(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Variables of a `scan_blocks=False` ResNet as the `scan_blocks=True` model expects.

    In every collection, `layer{i}_1 ... layer{i}_{n-1}` are stacked on a new leading axis
    as `layer{i}_rest`; `layer{i}_0` and everything else is kept as is.
    """
    out: dict[str, Any] = {}
    for col, tree in variables.items():
        kept, rest = {}, {}
        for key, value in tree.items():
            m = _BLOCK.match(key)
            if m and int(m.group(2)) > 0:
                rest.setdefault(m.group(1), {})[int(m.group(2))] = value
            else:
                kept[key] = value
        for stage, blocks in rest.items():
            ordered = [blocks[j] for j in sorted(blocks)]
            kept[f"{stage}_rest"] = jax.tree.map(lambda *xs: jnp.stack(xs), *ordered)
        out[col] = kept
    return out


def from_scan_layout(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `to_scan_layout`: `layer{i}_rest` unstacked into `layer{i}_1 ...`."""
    out: dict[str, Any] = {}
    for col, tree in variables.items():
        kept = {}
        for key, value in tree.items():
            m = _REST.match(key)
            if not m:
                kept[key] = value
                continue
            length = jax.tree.leaves(value)[0].shape[0]
            for j in range(length):
                kept[f"{m.group(1)}_{j + 1}"] = jax.tree.map(lambda a, j=j: a[j], value)
        out[col] = kept
    return out


# torchvision's ImageNet variants.
ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block=Bottleneck)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block=Bottleneck)

# He et al. 2016's CIFAR-10 networks: n blocks of two 3x3 convs per stage, 6n+2 layers.
CIFAR_DEPTHS = (20, 32, 44, 56, 110)


def cifar_resnet(depth: int) -> functools.partial:
    if (depth - 2) % 6:
        raise ValueError(f"a CIFAR ResNet has 6n+2 layers, got {depth}")
    n = (depth - 2) // 6
    return functools.partial(CifarResNet, stage_sizes=(n, n, n), block=BasicBlock, small_stem=True)


def plain_net(depth: int) -> functools.partial:
    """The same 6n+2 layers without shortcuts, which train worse the deeper they are."""
    return functools.partial(cifar_resnet(depth), shortcut="none", zero_init_residual=False)


def _out_size(side: int, small_stem: bool, n_stages: int) -> int:
    if not small_stem:
        side = layers.conv_output_size(side, 7, 2, 3)
        side = layers.pool_output_size(side, 3, 2, 1, ceil_mode=False)
    for _ in range(n_stages - 1):
        side = layers.conv_output_size(side, 3, 2, 1)
    return side


def _register() -> None:
    imagenet_min = layers.min_input_size(lambda s: _out_size(s, False, 4))
    cifar_min = layers.min_input_size(lambda s: _out_size(s, True, 3))
    imagenet = {
        "resnet18": (ResNet18, "basic blocks (2, 2, 2, 2)"),
        "resnet34": (ResNet34, "basic blocks (3, 4, 6, 3)"),
        "resnet50": (ResNet50, "bottlenecks (3, 4, 6, 3), V1.5"),
        "resnet101": (ResNet101, "bottlenecks (3, 4, 23, 3), V1.5"),
        "resnet152": (ResNet152, "bottlenecks (3, 8, 36, 3), V1.5"),
    }
    for name, (builder, blocks) in imagenet.items():
        register(
            ModelSpec(
                name=name,
                builder=builder,
                family="resnet",
                input_size=224,
                num_classes=1000,
                min_size=imagenet_min,
                small_input_options={"small_stem": True},
                description=f"ResNet, torchvision layout: {blocks}, projection shortcuts",
            )
        )
    for depth in CIFAR_DEPTHS:
        n = (depth - 2) // 6
        register(
            ModelSpec(
                name=f"resnet{depth}",
                builder=cifar_resnet(depth),
                family="resnet_cifar",
                input_size=32,
                num_classes=10,
                min_size=cifar_min,
                description=f"CIFAR ResNet (He et al. 2016): 3 stages of {n} basic blocks, "
                "16/32/64 channels, zero-padding shortcuts",
            )
        )
        register(
            ModelSpec(
                name=f"plain{depth}",
                builder=plain_net(depth),
                family="plain_cifar",
                input_size=32,
                num_classes=10,
                min_size=cifar_min,
                description=f"resnet{depth} without its shortcuts (the degradation experiment)",
            )
        )


_register()
