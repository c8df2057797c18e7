"""The residual block and NetResDeep, a deep stack of them (Stevens et al., *Deep Learning
with PyTorch*, ch. 8).

A plain deep stack is hard to train: the gradient reaching the first layers is a product of
many small factors. The residual block returns `out + x`, so each block only learns a
correction to its input and the identity path carries the gradient straight back.

    conv 3 -> n_chans @ 3x3, pad 1  -> ReLU -> max-pool 2
    n_blocks x ResBlock(n_chans)      (3x3 conv, no bias -> BatchNorm -> ReLU, then + x)
    max-pool 2 -> flatten -> fc 32 -> ReLU -> fc num_classes

With n_chans=32, n_blocks=10 and 10 classes on 32x32 RGB: 159,594 parameters.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxcnn.models import layers
from flaxcnn.models.registry import ModelSpec, register

# The book initialises the block's conv with Kaiming-normal (fan-in) and BatchNorm's scale
# with 0.5, so each block starts as a damped correction to the identity.
kaiming_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class ResBlock(nn.Module):
    """3x3 conv (no bias) -> BatchNorm -> ReLU [-> dropout], then `out + x`."""

    n_chans: int
    dropout_rate: float = 0.0
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = layers.ConvBN(
            self.n_chans,
            3,
            padding=1,
            kernel_init=kaiming_fan_in,
            bn_scale_init=nn.initializers.constant(0.5),
            axis_name=self.axis_name,
            dtype=self.dtype,
            name="conv_bn",
        )(x, train)
        out = nn.Dropout(self.dropout_rate, deterministic=not train)(out)
        return out + x


class NetResDeep(nn.Module):
    num_classes: int = 10
    n_chans: int = 32
    n_blocks: int = 10
    hidden: int = 32
    dropout_rate: float = 0.0  # > 0 gives each block the heavier dropout variant
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        layers.check_min_size(x, 4, "netresdeep")
        x = x.astype(self.dtype)
        x = layers.ConvBN(self.n_chans, 3, padding=1, norm=False, dtype=self.dtype, name="conv1")(
            x, train
        )
        x = layers.max_pool(x, 2)
        for i in range(self.n_blocks):
            x = ResBlock(
                self.n_chans,
                dropout_rate=self.dropout_rate,
                axis_name=self.axis_name,
                dtype=self.dtype,
                name=f"resblock{i + 1}",
            )(x, train)
        x = layers.flatten_nchw(layers.max_pool(x, 2))
        return layers.Classifier((self.hidden,), self.num_classes, dtype=self.dtype, name="fc")(
            x, train
        )


register(
    ModelSpec(
        name="netresdeep",
        builder=NetResDeep,
        family="netresdeep",
        input_size=32,
        num_classes=10,
        min_size=4,
        description="conv, a deep stack of residual blocks (conv-BN-ReLU, + x), two FC layers",
    )
)
