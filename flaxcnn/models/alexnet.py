"""AlexNet (Krizhevsky et al., 2012) in torchvision's single-tower layout.

    conv 64 @ 11x11 /4, pad 2  -> ReLU -> max-pool 3 /2
    conv 192 @ 5x5, pad 2      -> ReLU -> max-pool 3 /2
    conv 384 @ 3x3, pad 1      -> ReLU
    conv 256 @ 3x3, pad 1      -> ReLU
    conv 256 @ 3x3, pad 1      -> ReLU -> max-pool 3 /2
    adaptive average pool to 6x6, flatten (C, H, W order)
    dropout -> fc 4096 -> ReLU -> dropout -> fc 4096 -> ReLU -> fc num_classes

61,100,840 parameters at 1000 classes. ReLU instead of tanh and dropout in the big fully
connected layers were the paper's two ideas that made such a deep network trainable.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxcnn.models import layers
from flaxcnn.models.registry import ModelSpec, register

# (features, kernel, stride, padding, max-pool after)
FEATURES = (
    (64, 11, 4, 2, True),
    (192, 5, 1, 2, True),
    (384, 3, 1, 1, False),
    (256, 3, 1, 1, False),
    (256, 3, 1, 1, True),
)
MIN_SIZE = 63  # the smallest input whose last max-pool still has a 1x1 output


class AlexNet(nn.Module):
    num_classes: int = 1000
    dropout_rate: float = 0.5
    hidden_width: int = 4096
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        layers.check_min_size(x, MIN_SIZE, "alexnet")
        x = x.astype(self.dtype)
        for i, (features, kernel, stride, padding, pool) in enumerate(FEATURES):
            x = layers.ConvBN(
                features,
                kernel,
                stride,
                padding,
                norm=False,
                dtype=self.dtype,
                name=f"conv{i + 1}",
            )(x, train)
            if pool:
                x = layers.max_pool(x, 3, 2)
        x = layers.flatten_nchw(layers.adaptive_avg_pool(x, 6))
        return layers.Classifier(
            (self.hidden_width, self.hidden_width),
            self.num_classes,
            dropout_rate=self.dropout_rate,
            dropout_first=True,
            dtype=self.dtype,
            name="classifier",
        )(x, train)


register(
    ModelSpec(
        name="alexnet",
        builder=AlexNet,
        family="alexnet",
        input_size=224,
        min_size=MIN_SIZE,
        classifier=("classifier",),
        description="AlexNet: five conv layers, three fully connected, ReLU and dropout",
    )
)
