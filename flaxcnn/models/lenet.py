"""LeNet-5 (LeCun et al., 1998), the first convolutional network trained end to end.

    C1  6 @ 5x5 conv        32x32x1 -> 28x28x6
    S2  2x2 subsampling             -> 14x14x6
    C3  16 @ 5x5 conv               -> 10x10x16
    S4  2x2 subsampling             -> 5x5x16
    F5  120 units (fully connected to the 5x5x16 maps)
    F6  84 units
    output num_classes

61,706 parameters at 10 classes. The paper squashes with tanh and subsamples by averaging;
today's ReLU and max-pooling train faster, so they are the default and the paper's choice
is `activation="tanh", pooling="avg"`. 28x28 inputs (MNIST) take `c1_padding=2`, which
pads them to the 32x32 the paper used.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxcnn.models import layers
from flaxcnn.models.registry import ModelSpec, register

_ACTIVATIONS = {"relu": nn.relu, "tanh": jnp.tanh}


class LeNet5(nn.Module):
    num_classes: int = 10
    activation: Literal["relu", "tanh"] = "relu"
    pooling: Literal["max", "avg"] = "max"
    c1_padding: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"lenet5 activation must be 'relu' or 'tanh', got {self.activation!r}")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"lenet5 pooling must be 'max' or 'avg', got {self.pooling!r}")
        layers.check_min_size(x, 16 - 2 * self.c1_padding, "lenet5")
        act = _ACTIVATIONS[self.activation]
        pool = layers.max_pool if self.pooling == "max" else layers.avg_pool
        conv = functools.partial(
            layers.ConvBN,
            kernel_size=5,
            norm=False,
            act=act,
            dtype=self.dtype,
            kernel_init=nn.initializers.lecun_normal(),
        )
        dense = functools.partial(nn.Dense, dtype=self.dtype)

        x = x.astype(self.dtype)
        x = pool(conv(6, padding=self.c1_padding, name="c1")(x, train), 2)  # C1, S2
        x = pool(conv(16, name="c3")(x, train), 2)  # C3, S4
        x = layers.flatten_nchw(x)
        x = act(dense(120, name="f5")(x))
        x = act(dense(84, name="f6")(x))
        return dense(self.num_classes, name="output")(x)


register(
    ModelSpec(
        name="lenet5",
        builder=LeNet5,
        family="lenet",
        input_size=32,
        in_channels=1,
        num_classes=10,
        min_size=16,
        classifier=("output",),
        description="LeNet-5: two 5x5 conv/pool stages, then 120-84-classes (LeCun 1998)",
    )
)
