"""GoogLeNet / Inception v1 (Szegedy et al. 2014) in torchvision's layout.

An inception module looks at the same input through 1x1, 3x3 and 5x5 windows and a
max-pool at once and concatenates what it finds on the channel axis. The 1x1
convolutions in front of the 3x3 and 5x5 are bottlenecks that cut their input channels
(28x28x256 to 32 filters of 5x5 costs 160.6M multiply-adds; through a 16-channel 1x1
first, 13.2M), which is what makes nine modules affordable.

    conv1 7x7/2, 64; max-pool 3x3/2          112 -> 56
    conv2 1x1, 64; conv3 3x3, 192; max-pool  56 -> 28
    inception3a, 3b; max-pool                28 -> 14
    inception4a (aux1), 4b, 4c, 4d (aux2), 4e; max-pool 2x2   14 -> 7
    inception5a, 5b                          7
    global average pool, dropout 0.2, fc

torchvision adds BatchNorm (eps 1e-3) after every bias-free convolution, uses ceil-mode
max-pools, and a 3x3 kernel in the "5x5" branch (`paper_5x5=True` restores the 5x5).
Names follow torchvision's state_dict with a Sequential index joined by "_"
(`inception4a.branch2.1.conv.weight` is `inception4a/branch2_1/conv/kernel`).

`transform_input=True` is torchvision's `GoogLeNet(transform_input=True)`, which its
pretrained ImageNet weights need (`torchvision.models.googlenet(weights=...)` turns it on):
those weights were trained on images scaled to [-1, 1] (`(x - 0.5) / 0.5`), while the
pipeline hands over images normalised with ImageNet's mean and std; the first thing the
network does is map one onto the other, per channel c:

    x_c * (std_c / 0.5) + (mean_c - 0.5) / 0.5

with `flaxcnn.imagenet.MEAN` and `STD`. It has no parameters; leave it off for
networks trained here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxcnn import imagenet
from flaxcnn.models import layers
from flaxcnn.models.registry import ModelSpec, register

Array = jax.Array

BN_EPSILON = 1e-3
# torchvision draws conv and fc weights from trunc_normal_(std=0.01, a=-2, b=2); the cut
# at +-2 (absolute, i.e. 200 standard deviations) never bites, so this is a plain normal.
weight_init = nn.initializers.normal(0.01)


def basic_conv(axis_name: str | None, dtype: Any) -> Callable[..., nn.Module]:
    """torchvision's BasicConv2d: conv without bias, BatchNorm (eps 1e-3), ReLU."""
    return functools.partial(
        layers.ConvBN,
        bn_epsilon=BN_EPSILON,
        axis_name=axis_name,
        dtype=dtype,
        kernel_init=weight_init,
    )


class Inception(nn.Module):
    """Four branches over the same input, concatenated on channels.

    1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 (5x5 with `paper_5x5`) | 3x3/1 max-pool -> 1x1, each
    padded to keep the spatial size so that the branches line up; the output has
    ch1x1 + ch3x3 + ch5x5 + pool_proj channels.
    """

    ch1x1: int
    ch3x3red: int
    ch3x3: int
    ch5x5red: int
    ch5x5: int
    pool_proj: int
    paper_5x5: bool = False
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        conv = basic_conv(self.axis_name, self.dtype)
        k5 = 5 if self.paper_5x5 else 3
        branch1 = conv(self.ch1x1, 1, name="branch1")(x, train)
        branch2 = conv(self.ch3x3red, 1, name="branch2_0")(x, train)
        branch2 = conv(self.ch3x3, 3, padding=1, name="branch2_1")(branch2, train)
        branch3 = conv(self.ch5x5red, 1, name="branch3_0")(x, train)
        branch3 = conv(self.ch5x5, k5, padding=k5 // 2, name="branch3_1")(branch3, train)
        branch4 = layers.max_pool(x, 3, 1, padding=1, ceil_mode=True)
        branch4 = conv(self.pool_proj, 1, name="branch4_1")(branch4, train)
        return jnp.concatenate([branch1, branch2, branch3, branch4], axis=-1)


class InceptionAux(nn.Module):
    """Auxiliary classifier on an intermediate feature map (torchvision's InceptionAux).

    Adaptive 4x4 average pool, 1x1 conv to 128, fc 1024 + ReLU, dropout, fc. It only adds
    gradient to the middle of the network during training.
    """

    num_classes: int
    dropout_rate: float = 0.7
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = layers.adaptive_avg_pool(x, 4)
        x = layers.ConvBN(
            128,
            1,
            bn_epsilon=BN_EPSILON,
            axis_name=self.axis_name,
            dtype=self.dtype,
            kernel_init=weight_init,
            name="conv",
        )(x, train)
        x = layers.flatten_nchw(x)  # torch.flatten on NCHW: fc1's weights expect that order
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=weight_init)
        x = nn.relu(dense(1024, name="fc1")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(x)
        return dense(self.num_classes, name="fc2")(x)


# (ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj), the paper's Table 1.
INCEPTION_CONFIGS: dict[str, tuple[int, int, int, int, int, int]] = {
    "inception3a": (64, 96, 128, 16, 32, 32),
    "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64),
    "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64),
    "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128),
    "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}


def imagenet_to_unit_range(x: Array) -> Array:
    """torchvision's `GoogLeNet._transform_input` on NHWC input: undo the ImageNet mean/std
    normalisation and scale to [-1, 1] instead, `x_c * (std_c / 0.5) + (mean_c - 0.5) / 0.5`
    (computed in at least float32)."""
    mean, std = np.asarray(imagenet.MEAN, np.float32), np.asarray(imagenet.STD, np.float32)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x * (std / 0.5) + (mean - 0.5) / 0.5


class GoogLeNet(nn.Module):
    """GoogLeNet. With `aux_logits`, train mode returns `(logits, (aux1, aux2))`.

    The auxiliary heads (after inception4a and 4d) exist whenever `aux_logits` is set, so
    that variables from an eval-mode init also serve training; they are only evaluated
    during training (and init).
    """

    num_classes: int = 1000
    aux_logits: bool = False
    paper_5x5: bool = False
    transform_input: bool = False
    dropout_rate: float = 0.2
    aux_dropout_rate: float = 0.7
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array | tuple[Array, tuple[Array, Array]]:
        layers.check_min_size(x, MIN_SIZE, "googlenet")
        if self.transform_input:
            x = imagenet_to_unit_range(x)
        x = x.astype(self.dtype)
        conv = basic_conv(self.axis_name, self.dtype)
        inception = functools.partial(
            Inception, paper_5x5=self.paper_5x5, axis_name=self.axis_name, dtype=self.dtype
        )
        aux = functools.partial(
            InceptionAux,
            self.num_classes,
            dropout_rate=self.aux_dropout_rate,
            axis_name=self.axis_name,
            dtype=self.dtype,
        )
        run_aux = self.aux_logits and (train or self.is_initializing())

        def module(name: str, x: Array) -> Array:
            return inception(*INCEPTION_CONFIGS[name], name=name)(x, train)

        x = conv(64, 7, strides=2, padding=3, name="conv1")(x, train)
        x = layers.max_pool(x, 3, 2, ceil_mode=True)
        x = conv(64, 1, name="conv2")(x, train)
        x = conv(192, 3, padding=1, name="conv3")(x, train)
        x = layers.max_pool(x, 3, 2, ceil_mode=True)

        x = module("inception3a", x)
        x = module("inception3b", x)
        x = layers.max_pool(x, 3, 2, ceil_mode=True)

        x = module("inception4a", x)
        aux1 = aux(name="aux1")(x, train) if run_aux else None
        x = module("inception4b", x)
        x = module("inception4c", x)
        x = module("inception4d", x)
        aux2 = aux(name="aux2")(x, train) if run_aux else None
        x = module("inception4e", x)
        x = layers.max_pool(x, 2, 2, ceil_mode=True)

        x = module("inception5a", x)
        x = module("inception5b", x)

        x = layers.global_avg_pool(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(x)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=weight_init, name="fc")(x)
        if run_aux and train:
            return logits, (aux1, aux2)
        return logits


def _out_size(side: int) -> int:
    side = layers.conv_output_size(side, 7, 2, 3)
    for window in (3, 3, 3, 2):  # the four max-pools; the convs in between keep the size
        side = layers.pool_output_size(side, window, 2, 0, ceil_mode=True)
    return side


MIN_SIZE = layers.min_input_size(_out_size)

register(
    ModelSpec(
        name="googlenet",
        builder=GoogLeNet,
        family="inception",
        input_size=224,
        num_classes=1000,
        min_size=MIN_SIZE,
        classifier=("fc",),  # the auxiliary heads only train with the whole network
        description="GoogLeNet (Inception v1), torchvision layout: BatchNorm, 3x3 in the "
        "'5x5' branch; aux_logits adds the two auxiliary classifiers",
    )
)
