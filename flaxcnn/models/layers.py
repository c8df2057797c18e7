"""Shared building blocks: PyTorch-style padding, conv + norm + activation, pooling.

Every model in `flaxcnn.models` is assembled from these pieces so that padding, pooling
and flatten order match torchvision exactly (converted weights must give the same logits).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flaxcnn.models.batchnorm import BatchNorm

Array = jax.Array
Dtype = Any
IntPair = int | tuple[int, int]

# torchvision initialises convolutions with He (Kaiming) normal over fan-out.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# PyTorch's BatchNorm momentum 0.1 weights the *new* batch; Flax's weights the *old* average.
TORCH_BN_MOMENTUM = 0.9
TORCH_BN_EPSILON = 1e-5


def pair(v: IntPair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def torch_padding(padding: IntPair) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch's symmetric `padding=p` as explicit Flax padding (Flax's "SAME" can differ)."""
    ph, pw = pair(padding)
    return ((ph, ph), (pw, pw))


def conv_general_dilated(
    lhs: Array,
    rhs: Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **kwargs: Any,
) -> Array:
    """`lax.conv_general_dilated`, as a matrix product where XLA's CPU convolution is slow.

    On CPU two kinds of convolution are computed as matrix products (the same sums, the
    same parameters), measured faster forward and backward on a 2-core Xeon:

    * 1x1 kernels without padding (ResNet projections and bottlenecks): the (strided)
      pixels times the kernel, 1.7-2.0x faster than XLA's convolution forward and 2.4-3.0x
      backward (docs/measurements.md, "CPU defaults");
    * images smaller than the kernel (a 3x3 conv on the 2x2 and 1x1 maps at the end of a
      ResNet on small images, where XLA's convolution is 10-50x slower): gathered taps
      times the reshaped kernel.

    Everywhere else this is exactly `lax.conv_general_dilated`; on CPU, an input of at
    least `MATERIALIZE_MIN_CHANNELS` channels goes through `materialized` first.
    """
    path = _matmul_path(
        lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count
    )
    if path is None:
        if _materialize_input(lhs, rhs, dimension_numbers):
            lhs = materialized(lhs)
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
            dimension_numbers, feature_group_count, precision=precision, **kwargs,
        )  # fmt: skip
    sh, sw = window_strides
    if path == "pointwise":
        return jnp.dot(lhs[:, ::sh, ::sw, :], rhs[0, 0], precision=precision, **kwargs)
    kh, kw = rhs.shape[0], rhs.shape[1]
    (pt, pb), (pl, pr) = padding
    x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho = (x.shape[1] - kh) // sh + 1
    wo = (x.shape[2] - kw) // sw + 1
    taps = [
        x[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]  # (kh, kw, C) order, as the HWIO kernel is laid out
    patches = jnp.concatenate(taps, axis=-1)
    kernel = rhs.reshape(-1, rhs.shape[-1])
    return jnp.dot(patches, kernel, precision=precision, **kwargs)


def _matmul_path(
    lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count
) -> str | None:
    """ "pointwise", "taps" or None (XLA's convolution): see `conv_general_dilated`."""
    plain = (
        _nhwc_on_cpu(lhs, rhs, dimension_numbers)
        and feature_group_count == 1
        and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    )
    if not plain:
        return None
    kh, kw = rhs.shape[0], rhs.shape[1]
    if (kh, kw) == (1, 1):
        # "SAME" and "VALID" never pad a 1x1 kernel, at any stride (Flax's default is "SAME").
        unpadded = isinstance(padding, str) or all(p == 0 for pair_ in padding for p in pair_)
        return "pointwise" if unpadded else None
    if not isinstance(padding, str) and min(lhs.shape[1], lhs.shape[2]) < max(kh, kw):
        return "taps"
    return None


# The fewest input channels for which a convolution's input is `materialized` on CPU:
# ResNet-20's stages (16-64 channels) and the torchvision ResNets gain; LeNet-5's convolutions
# (1 and 6 input channels) ran slower with it (docs/cpu-speed.md).
MATERIALIZE_MIN_CHANNELS = 16


def _materialize_input(lhs: Array, rhs: Array, dimension_numbers: Any) -> bool:
    return _nhwc_on_cpu(lhs, rhs, dimension_numbers) and lhs.shape[-1] >= MATERIALIZE_MIN_CHANNELS


_NHWC = ("NHWC", "HWIO", "NHWC")


def _nhwc_on_cpu(lhs: Array, rhs: Array, dimension_numbers: Any) -> bool:
    """A 2-D convolution of NHWC images with an HWIO kernel, on the CPU backend."""
    return (
        jax.default_backend() == "cpu"
        and lhs.ndim == 4
        and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    )


@jax.custom_jvp
def materialized(x: Array) -> Array:
    """`x`, bit for bit; in a differentiated step, written to memory once instead of
    recomputed by its consumers.

    In a train step XLA:CPU lays a convolution's input out batch-innermost, `[C, H, W, N]`,
    for the kernel's gradient, and fuses the elementwise ops that made the input (BatchNorm's
    scale and shift, ReLU, the residual additions of the blocks before) into that
    transposing copy: it recomputes them, reading the saved convolution outputs 64 KiB
    apart, instead of reading the activation the forward pass already wrote. In ResNet-20's
    step those copies took a third of the time. XLA does not copy a producer that holds an
    expensive op into several consumers, so under differentiation (the JVP rule) this
    selects `x` over `exp(x)` (never taken: a NaN stays a NaN), and the transposing copies
    read the stored activation; gradients pass through unchanged, with no `exp` in them.
    Without differentiation (evaluation, inference) there is no kernel gradient to feed and
    this is `x` itself, at no cost.
    """
    return x


@materialized.defjvp
def _materialized_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return jnp.where(x == x, x, jnp.exp(x)), t


class Conv(nn.Conv):
    """`nn.Conv` with the CPU-friendly `conv_general_dilated` above; same parameters."""

    conv_general_dilated: Callable = conv_general_dilated


def pool_output_size(size: int, window: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """Output length of a PyTorch pooling layer along one axis."""
    span = size + 2 * padding - window
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    # PyTorch drops a last window that would start entirely inside the right padding.
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _pool_padding(size: int, window: int, stride: int, padding: int, ceil_mode: bool):
    out = pool_output_size(size, window, stride, padding, ceil_mode)
    needed = (out - 1) * stride + window - size - padding  # right padding actually used
    return (padding, max(needed, 0))


_pooling_observer: contextvars.ContextVar[Callable[[str, Array], None] | None] = (
    contextvars.ContextVar("pooling_observer", default=None)
)


@contextlib.contextmanager
def observe_pooling(callback: Callable[[str, Array], None]) -> Iterator[None]:
    """Call `callback(kind, output)` after each pooling below (kind: "MaxPool", "AvgPool",
    "AdaptiveAvgPool", "GlobalAvgPool"): they are functions, not modules, so the summary,
    which sees modules through `nn.intercept_methods`, would leave them out."""
    token = _pooling_observer.set(callback)
    try:
        yield
    finally:
        _pooling_observer.reset(token)


def _pooling(kind: str) -> Callable[[Callable[..., Array]], Callable[..., Array]]:
    """Make a pooling function report to `observe_pooling`; a pooling made of another
    (an adaptive pool that is an average pool) reports once, as itself."""

    def decorate(pool: Callable[..., Array]) -> Callable[..., Array]:
        @functools.wraps(pool)
        def observed(*args: Any, **kwargs: Any) -> Array:
            callback = _pooling_observer.get()
            if callback is None:
                return pool(*args, **kwargs)
            token = _pooling_observer.set(None)
            try:
                out = pool(*args, **kwargs)
            finally:
                _pooling_observer.reset(token)
            callback(kind, out)
            return out

        return observed

    return decorate


@_pooling("MaxPool")
def max_pool(
    x: Array,
    window: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    ceil_mode: bool = False,
) -> Array:
    """`torch.nn.MaxPool2d` on NHWC input: padding never wins the max, `ceil_mode` as in torch."""
    window, stride = pair(window), pair(stride if stride is not None else window)
    padding = pair(padding)
    pads = tuple(
        _pool_padding(x.shape[1 + i], window[i], stride[i], padding[i], ceil_mode) for i in range(2)
    )
    return nn.max_pool(x, window, stride, padding=pads)


@_pooling("AvgPool")
def avg_pool(x: Array, window: IntPair, stride: IntPair | None = None) -> Array:
    """`torch.nn.AvgPool2d` without padding (the only form the classic nets use)."""
    window = pair(window)
    return nn.avg_pool(x, window, pair(stride if stride is not None else window))


@_pooling("AdaptiveAvgPool")
def adaptive_avg_pool(x: Array, output_size: IntPair) -> Array:
    """`torch.nn.AdaptiveAvgPool2d` on NHWC input.

    Output cell i averages rows floor(i*H/out) .. ceil((i+1)*H/out), exactly as torch does,
    including the case H < out where cells repeat input rows.
    """
    out_h, out_w = pair(output_size)
    h, w = x.shape[1], x.shape[2]
    if (h, w) == (out_h, out_w):
        return x
    if h % out_h == 0 and w % out_w == 0:
        return avg_pool(x, (h // out_h, w // out_w))

    def bins(size: int, out: int):
        return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]

    rows = [jnp.mean(x[:, a:b], axis=1, keepdims=True) for a, b in bins(h, out_h)]
    x = jnp.concatenate(rows, axis=1)
    cols = [jnp.mean(x[:, :, a:b], axis=2, keepdims=True) for a, b in bins(w, out_w)]
    return jnp.concatenate(cols, axis=2)


@_pooling("GlobalAvgPool")
def global_avg_pool(x: Array) -> Array:
    """Mean over the spatial axes: (N, H, W, C) -> (N, C)."""
    return jnp.mean(x, axis=(1, 2))


def flatten_nchw(x: Array) -> Array:
    """Flatten in PyTorch's (C, H, W) order so that torchvision classifier weights line up."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def check_min_size(x: Array, min_size: int, name: str) -> None:
    """Fail at trace time, with the number a user needs, when an input is too small."""
    h, w = x.shape[1], x.shape[2]
    if h < min_size or w < min_size:
        raise ValueError(
            f"{name} needs inputs of at least {min_size}x{min_size} pixels, got {h}x{w}"
        )


def min_input_size(output_size: Callable[[int], int], start: int = 1, limit: int = 4096) -> int:
    """Smallest input side for which `output_size(side) >= 1` (the layer stack is monotone)."""
    for side in range(start, limit):
        if output_size(side) >= 1:
            return side
    raise ValueError("no input size up to the limit gives a non-empty output")


def batch_norm(
    train: bool,
    *,
    axis_name: str | None = None,
    dtype: Dtype = jnp.float32,
    epsilon: float = TORCH_BN_EPSILON,
    scale_init: Callable = nn.initializers.ones,
    name: str | None = None,
) -> BatchNorm:
    """BatchNorm with PyTorch's defaults; `axis_name` makes statistics global across devices."""
    return BatchNorm(
        use_running_average=not train,
        momentum=TORCH_BN_MOMENTUM,
        epsilon=epsilon,
        axis_name=axis_name,
        dtype=dtype,
        scale_init=scale_init,
        name=name,
    )


class ConvBN(nn.Module):
    """Conv -> (BatchNorm) -> (activation): the unit every classic CNN repeats.

    With `norm=True` the convolution has no bias (BatchNorm's shift replaces it), as in
    torchvision. `act=None` leaves the output linear (e.g. before a residual addition).
    """

    features: int
    kernel_size: IntPair = 3
    strides: IntPair = 1
    padding: IntPair = 0
    norm: bool = True
    act: Callable[[Array], Array] | None = nn.relu
    use_bias: bool | None = None  # default: bias only without BatchNorm
    bn_epsilon: float = TORCH_BN_EPSILON
    bn_scale_init: Callable = nn.initializers.ones
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    kernel_init: Callable = kaiming_fan_out

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        use_bias = (not self.norm) if self.use_bias is None else self.use_bias
        x = Conv(
            self.features,
            pair(self.kernel_size),
            strides=pair(self.strides),
            padding=torch_padding(self.padding),
            use_bias=use_bias,
            dtype=self.dtype,
            kernel_init=self.kernel_init,
            name="conv",
        )(x)
        if self.norm:
            x = batch_norm(
                train,
                axis_name=self.axis_name,
                dtype=self.dtype,
                epsilon=self.bn_epsilon,
                scale_init=self.bn_scale_init,
                name="bn",
            )(x)
        if self.act is not None:
            x = self.act(x)
        return x


class Classifier(nn.Module):
    """Fully connected head: (dropout -> dense -> ReLU) per hidden width, then the logits.

    This is where the local features of the convolutional part are combined: each dense
    layer is `wx + b` changing the dimension. Dropout comes before each hidden dense layer with
    `dropout_first`, as in AlexNet, or after each hidden ReLU, as in VGG.
    """

    hidden: Sequence[int]
    num_classes: int
    dropout_rate: float = 0.0
    dropout_first: bool = False
    dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=self.kernel_init)
        drop = nn.Dropout(self.dropout_rate, deterministic=not train)
        for i, width in enumerate(self.hidden):
            if self.dropout_first:
                x = drop(x)
            x = nn.relu(dense(width, name=f"fc{i + 1}")(x))
            if not self.dropout_first:
                x = drop(x)
        return dense(self.num_classes, name=f"fc{len(self.hidden) + 1}")(x)
