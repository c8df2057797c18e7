"""The plain pipeline a CNN course starts from: (conv -> ReLU -> max-pool) x N, then FC layers.

The convolutions find local features; each pooling halves the resolution so later
convolutions see a larger part of the image; the flatten and the fully connected layers
(`wx + b`) change the dimension and combine the local features into class scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxcnn.models import layers
from flaxcnn.models.registry import ModelSpec, register


class SimpleCNN(nn.Module):
    """`len(features)` conv blocks of the given widths, then `hidden` dense layers."""

    num_classes: int = 10
    features: Sequence[int] = (16, 32, 64)
    kernel_size: int = 3
    hidden: Sequence[int] = (64,)
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        layers.check_min_size(x, 2 ** len(self.features), "simple_cnn")
        x = x.astype(self.dtype)
        for i, width in enumerate(self.features):
            x = layers.ConvBN(
                width,
                self.kernel_size,
                padding=self.kernel_size // 2,
                norm=False,
                dtype=self.dtype,
                name=f"conv{i + 1}",
            )(x, train)
            x = layers.max_pool(x, 2)
        x = layers.flatten_nchw(x)
        return layers.Classifier(
            self.hidden,
            self.num_classes,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            name="classifier",
        )(x, train)


register(
    ModelSpec(
        name="simple_cnn",
        builder=SimpleCNN,
        family="simple",
        input_size=32,
        num_classes=10,
        min_size=8,
        classifier=("classifier",),
        description="plain conv/ReLU/max-pool blocks, flatten, dense layers",
    )
)
