"""VGG (Simonyan & Zisserman, 2014): only 3x3 convolutions, depth as the one knob.

Two stacked 3x3 convolutions see a 5x5 window and three see 7x7, with fewer parameters
and more non-linearities than one big kernel. Configurations A, B, D and E of the paper's
Table 1 are VGG-11, -13, -16 and -19; `CONFIGS` below lists them as in the table
(numbers are conv widths, "M" a 2x2 max-pool).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxcnn.models import layers
from flaxcnn.models.registry import ModelSpec, register

M = "M"
CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M),
    13: (64, 64, M, 128, 128, M, 256, 256, M, 512, 512, M, 512, 512, M),
    16: (64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M),
    19: (64, 64, M, 128, 128, M, 256, 256, 256, 256, M, 512, 512, 512, 512, M,
         512, 512, 512, 512, M),
}  # fmt: skip


class VGG(nn.Module):
    """torchvision's VGG: conv 3x3 pad 1 (+ BatchNorm) + ReLU, adaptive 7x7 pool, 3 FC layers.

    torchvision keeps the conv bias even with BatchNorm; so do we, so that its parameter
    counts and weights carry over exactly.
    """

    config: Sequence[int | str]
    num_classes: int = 1000
    batch_norm: bool = False
    dropout_rate: float = 0.5
    hidden_width: int = 4096
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        layers.check_min_size(x, 2 ** self.config.count(M), "vgg")
        x = x.astype(self.dtype)
        conv = 0
        for v in self.config:
            if v == M:
                x = layers.max_pool(x, 2)
                continue
            conv += 1
            x = layers.ConvBN(
                v,
                3,
                padding=1,
                norm=self.batch_norm,
                use_bias=True,
                axis_name=self.axis_name,
                dtype=self.dtype,
                name=f"conv{conv}",
            )(x, train)
        x = layers.flatten_nchw(layers.adaptive_avg_pool(x, 7))
        return layers.Classifier(
            (self.hidden_width, self.hidden_width),
            self.num_classes,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(0.01),
            name="classifier",
        )(x, train)


for _depth, _config in CONFIGS.items():
    for _bn in (False, True):
        _name = f"vgg{_depth}" + ("_bn" if _bn else "")
        register(
            ModelSpec(
                name=_name,
                builder=functools.partial(VGG, config=_config, batch_norm=_bn),
                family="vgg",
                input_size=224,
                min_size=32,
                classifier=("classifier",),
                description=f"VGG-{_depth}" + (" with BatchNorm" if _bn else ""),
            )
        )
