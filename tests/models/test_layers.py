import itertools
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcnn.models import layers


def torch_adaptive_avg_pool_reference(x: np.ndarray, out: int) -> np.ndarray:
    """PyTorch's definition, written as loops: cell i averages [floor(iH/o), ceil((i+1)H/o))."""
    n, h, w, c = x.shape
    y = np.zeros((n, out, out, c), x.dtype)
    for i, j in itertools.product(range(out), range(out)):
        r0, r1 = (i * h) // out, -(-((i + 1) * h) // out)
        c0, c1 = (j * w) // out, -(-((j + 1) * w) // out)
        y[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return y


@pytest.mark.parametrize("size, out", [(14, 7), (13, 7), (1, 7), (3, 7), (10, 6), (6, 6)])
def test_adaptive_avg_pool_matches_torch_definition(size, out):
    x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
    np.testing.assert_allclose(
        layers.adaptive_avg_pool(jnp.asarray(x), out),
        torch_adaptive_avg_pool_reference(x, out),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "size, window, stride, padding, ceil_mode, expected",
    [
        (112, 3, 2, 0, True, 56),  # GoogLeNet's first pool
        (112, 3, 2, 0, False, 55),
        (55, 3, 2, 0, False, 27),  # AlexNet
        (5, 2, 2, 1, True, 3),  # the last window would start in the padding: dropped
        (7, 3, 1, 1, False, 7),  # Inception's pool branch keeps the size
    ],
)
def test_pool_output_size_follows_torch(size, window, stride, padding, ceil_mode, expected):
    assert layers.pool_output_size(size, window, stride, padding, ceil_mode) == expected
    x = jnp.ones((1, size, size, 1))
    y = layers.max_pool(x, window, stride, padding, ceil_mode)
    assert y.shape == (1, expected, expected, 1)


def test_max_pool_padding_never_wins():
    x = -jnp.arange(1.0, 26.0).reshape(1, 5, 5, 1)  # all negative: zero padding would win
    y = layers.max_pool(x, 2, 2, padding=1, ceil_mode=True)
    assert float(y.max()) < 0
    assert float(y[0, 0, 0, 0]) == -1.0


def test_flatten_nchw_is_channel_major():
    x = jnp.arange(2 * 2 * 3).reshape(1, 2, 2, 3)  # NHWC
    flat = layers.flatten_nchw(x)
    np.testing.assert_array_equal(flat[0], np.transpose(np.asarray(x), (0, 3, 1, 2)).ravel())


def test_conv_bn_has_bias_only_without_norm():
    x = jnp.ones((1, 8, 8, 3))

    def init(module):  # the variables' structure: abstract, nothing compiled
        return jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)

    with_norm = init(layers.ConvBN(4, 3, padding=1))
    without = init(layers.ConvBN(4, 3, padding=1, norm=False))
    assert "bias" not in with_norm["params"]["conv"]
    assert "bn" in with_norm["params"] and "batch_stats" in with_norm
    assert "bias" in without["params"]["conv"] and "batch_stats" not in without


def test_check_min_size_message():
    with pytest.raises(ValueError, match="at least 32x32 pixels, got 16x40"):
        layers.check_min_size(jnp.zeros((1, 16, 40, 3)), 32, "vgg")


# (input NHWC, kernel HWIO, strides, padding, the matrix-product path taken on CPU)
CONV_CASES = [
    ((4, 8, 8, 16), (1, 1, 16, 32), (1, 1), ((0, 0), (0, 0)), "pointwise"),
    ((4, 9, 9, 16), (1, 1, 16, 32), (2, 2), ((0, 0), (0, 0)), "pointwise"),
    ((3, 8, 6, 8), (1, 1, 8, 4), (2, 1), ((0, 0), (0, 0)), "pointwise"),
    ((4, 2, 2, 16), (3, 3, 16, 8), (1, 1), ((1, 1), (1, 1)), "taps"),
    ((4, 2, 2, 16), (3, 3, 16, 8), (2, 2), ((1, 1), (1, 1)), "taps"),
    ((4, 1, 1, 16), (3, 3, 16, 8), (1, 1), ((1, 1), (1, 1)), "taps"),
    ((4, 8, 8, 16), (3, 3, 16, 8), (1, 1), ((1, 1), (1, 1)), None),
    ((4, 8, 8, 16), (1, 1, 16, 8), (1, 1), ((1, 1), (1, 1)), None),  # padded 1x1
    ((4, 9, 9, 16), (1, 1, 16, 8), (2, 2), "SAME", "pointwise"),  # Flax's default padding
    ((4, 9, 9, 16), (1, 1, 16, 8), (2, 2), "VALID", "pointwise"),
    ((4, 2, 2, 16), (3, 3, 16, 8), (1, 1), "SAME", None),
]


@pytest.mark.parametrize("lhs_shape, rhs_shape, strides, padding, path", CONV_CASES)
def test_conv_matrix_product_paths_equal_lax_conv(lhs_shape, rhs_shape, strides, padding, path):
    """Values and gradients (input and kernel) of the CPU paths equal XLA's convolution."""
    dn = ("NHWC", "HWIO", "NHWC")
    # numpy draws: an eager jax.random call compiles a program for every new shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(lhs_shape, np.float32))
    w = jnp.asarray(0.2 * rng.standard_normal(rhs_shape, np.float32))
    numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, dn)
    assert layers._matmul_path(x, w, padding, None, None, numbers, 1) == path

    def ours(x, w):
        return layers.conv_general_dilated(x, w, strides, padding, dimension_numbers=numbers)

    def reference(x, w):
        return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)

    y_ref = reference(x, w)
    dy = jnp.asarray(rng.standard_normal(y_ref.shape, np.float32))
    got = jax.jit(lambda x, w: jax.vjp(ours, x, w)[1](dy))(x, w)
    want = jax.vjp(reference, x, w)[1](dy)
    np.testing.assert_allclose(jax.jit(ours)(x, w), y_ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_resnet_projections_take_the_pointwise_path(monkeypatch):
    """ResNet's 1x1 convolutions (Flax's default "SAME" padding) are matrix products on CPU."""
    from flaxcnn import models

    seen = []
    original = layers._matmul_path
    monkeypatch.setattr(
        layers, "_matmul_path", lambda lhs, rhs, *a: seen.append(original(lhs, rhs, *a)) or seen[-1]
    )
    model = models.create("resnet50", num_classes=10, small_stem=True)
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), jnp.ones((1, 8, 8, 3)))
    # 53 convolutions, each traced once. Pointwise: conv1 and conv3 of the 16 bottlenecks
    # and the 4 projections. Taps: the 3x3 conv2 wherever its input is under 3x3 (2x2 in
    # layer3_1..5 and layer4_0, 1x1 in layer4_1..2). XLA's: the 3x3 stem and the other 3x3s.
    assert Counter(seen) == {"pointwise": 2 * 16 + 4, "taps": 5 + 3, None: 1 + 3 + 4 + 1}


def test_materialized_is_the_identity_bit_for_bit_and_in_its_gradient():
    """Differentiated or not, every float comes back unchanged, the signed zero and the
    infinities included, and the gradient is the incoming one even where exp(x) overflows."""
    x = jnp.asarray([0.0, -0.0, 1.5, -3.25, 88.0, 100.0, 1e30, -1e30, np.inf, -np.inf, 1e-45])
    t = jnp.arange(x.size, dtype=jnp.float32)
    plain = jax.jit(layers.materialized)(x)
    primal, tangent = jax.jit(lambda x, t: jax.jvp(layers.materialized, (x,), (t,)))(x, t)
    for out in (plain, primal):
        np.testing.assert_array_equal(
            np.asarray(out).view(np.uint32), np.asarray(x).view(np.uint32)
        )
    np.testing.assert_array_equal(tangent, t)
    assert np.isnan(jax.jvp(layers.materialized, (jnp.asarray([np.nan]),), (t[:1],))[0])[0]
    g = jax.jit(jax.grad(lambda x: jnp.sum(layers.materialized(x) * jnp.arange(3.0))))
    np.testing.assert_array_equal(g(jnp.asarray([1.0, 100.0, 1e30])), [0.0, 1.0, 2.0])


def test_a_materialized_input_leaves_the_train_steps_gradients_unchanged(monkeypatch):
    """ResNet-20's gradients (batch statistics on) with the inputs of its 16-64-channel
    convolutions materialized equal, bit for bit, those without: only XLA's fusion changes."""
    from flaxcnn import models

    model = models.create("resnet20", num_classes=10)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 16, 16, 3), np.float32))
    y = jnp.arange(8) % 10
    variables = model.init(jax.random.key(0), x, train=False)

    def gradients():
        def loss(params):
            out, _ = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), y[:, None], 1))

        return jax.jit(jax.grad(loss))(variables["params"])

    calls = []
    original = layers.materialized
    monkeypatch.setattr(layers, "materialized", lambda a: calls.append(a.shape) or original(a))
    with_it = gradients()
    # Every 3x3 convolution but the stem's (3 input channels): 7 take 16 channels, 6 take
    # 32, 5 take 64; Flax traces each one more than once.
    traces = len(calls) // 18
    assert traces >= 1
    assert Counter(calls) == {
        (8, 16, 16, 16): 7 * traces,
        (8, 8, 8, 32): 6 * traces,
        (8, 4, 4, 64): 5 * traces,
    }
    monkeypatch.setattr(layers, "MATERIALIZE_MIN_CHANNELS", 10**6)
    calls.clear()
    without = gradients()
    assert not calls
    for a, b in zip(jax.tree.leaves(with_it), jax.tree.leaves(without), strict=True):
        np.testing.assert_array_equal(a, b)
