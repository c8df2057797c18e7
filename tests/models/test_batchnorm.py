"""flaxcnn's BatchNorm against flax.linen.BatchNorm: same variables, values and gradients.

Its sums are matrix products on CPU and its backward pass is written by hand, so every
path is compared with Flax's own module (autodiff through `jnp.mean`): train and eval
mode, running-average updates, the gradients of the input, scale and bias, statistics
over four devices (pmap and shard_map), bfloat16 compute, and a clipped variance.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from flaxcnn.models.batchnorm import BatchNorm, channel_sums

SETTINGS = {"momentum": 0.9, "epsilon": 1e-5}


def floats(values):
    """JAX's default float (float64 under `jax.enable_x64`), as `jax.random` would give."""
    return jnp.asarray(values, dtype=jax.dtypes.canonicalize_dtype(np.float64))


def normal(seed, shape, scale=1.0, offset=0.0):
    """`offset + scale * N(0, 1)` values, drawn with numpy: an eager `jax.random` call
    compiles a program for every new shape (1-2 s of each test here)."""
    return floats(offset + scale * np.random.default_rng(seed).standard_normal(shape))


def variables(shape, seed=0):
    """Flax's variables for inputs of `shape`, with non-trivial parameters and statistics."""
    c = shape[-1]
    return {
        "params": {
            "scale": normal(seed + 10, (c,), 0.3, 1.0),
            "bias": normal(seed + 20, (c,), 0.2),
        },
        "batch_stats": {
            "mean": normal(seed + 30, (c,), 0.1),
            "var": floats(1.0 + 0.5 * np.random.default_rng(seed + 40).random(c)),
        },
    }


def inputs(shape, seed=1):
    offsets = np.arange(shape[-1]) * 0.1  # per-channel offsets: the mean matters
    return floats(3.0 * np.random.default_rng(seed).standard_normal(shape) + offsets)


def loss_and_state(module, v, x, dy):
    """A loss that weighs every output differently, and the updated statistics."""
    y, new = module.apply(v, x, mutable=["batch_stats"])
    return jnp.sum(y.astype(jnp.float32) * dy), new["batch_stats"]


def assert_close(ours, theirs, tol):
    """Equal leaf by leaf up to `tol` relative to each leaf's largest value: a gradient
    summed over many rows can cancel to near zero, where float32 rounding of the terms
    (not of the result) sets the error."""
    chex.assert_trees_all_equal_structs(ours, theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())))


def grads_and_state(module, v, x, dy):
    """Loss, new statistics and the gradients of the parameters and the input, compiled as
    training compiles them (and in one program: op by op, each small shape compiles alone)."""

    def loss(params, x):
        return loss_and_state(module, {**v, "params": params}, x, dy)

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (value, stats), (dparams, dx) = value_and_grad(v["params"], x)
    return value, stats, dparams, dx


def test_same_variables_as_flax():
    x = jnp.ones((2, 3, 3, 5))
    ours = BatchNorm(use_running_average=False, **SETTINGS).init(jax.random.key(0), x)
    theirs = nn.BatchNorm(use_running_average=False, **SETTINGS).init(jax.random.key(0), x)
    chex.assert_trees_all_equal(ours, theirs)
    chex.assert_trees_all_equal_dtypes(ours, theirs)


@pytest.mark.parametrize(
    "use_running_average, shape, tol",
    [
        (False, (8, 6, 6, 16), 1e-5),
        (False, (64, 4, 4, 32), 1e-5),
        (False, (3, 7), 1e-5),
        (True, (4, 5, 5, 8), 1e-6),  # eval mode: the stored statistics, no sums
    ],
)
def test_train_and_eval_mode_match_flax(use_running_average, shape, tol):
    v, x = variables(shape), inputs(shape)
    dy = normal(2, shape)
    settings = {**SETTINGS, "use_running_average": use_running_average}
    ours = grads_and_state(BatchNorm(**settings), v, x, dy)
    theirs = grads_and_state(nn.BatchNorm(**settings), v, x, dy)
    assert_close(ours, theirs, tol)


def test_bfloat16_compute_matches_flax():
    shape = (16, 4, 4, 8)
    v, x = variables(shape), inputs(shape).astype(jnp.bfloat16)
    dy = normal(2, shape)
    settings = {**SETTINGS, "dtype": jnp.bfloat16, "use_running_average": False}
    ours = grads_and_state(BatchNorm(**settings), v, x, dy)
    theirs = grads_and_state(nn.BatchNorm(**settings), v, x, dy)
    chex.assert_trees_all_equal_dtypes(ours, theirs)
    assert_close(ours, theirs, 2e-2)


def test_constant_channel_clips_variance_like_flax():
    """A constant channel has variance 0 (rounding may make E[x^2] - E[x]^2 negative)."""
    shape = (8, 3, 3, 4)
    v, x = variables(shape), inputs(shape)
    x = x.at[..., 1].set(0.7)
    dy = normal(2, shape)
    ours = grads_and_state(BatchNorm(use_running_average=False, **SETTINGS), v, x, dy)
    theirs = grads_and_state(nn.BatchNorm(use_running_average=False, **SETTINGS), v, x, dy)
    assert_close(ours, theirs, 1e-5)
    assert np.all(np.isfinite(np.asarray(ours[3])))


def test_gradient_of_returned_statistics():
    """Differentiating through the batch mean and variance is right too (not just y)."""
    from flaxcnn.models.batchnorm import normalize_batch

    x = inputs((12, 5))
    scale, bias = jnp.full((5,), 1.3), jnp.full((5,), 0.1)

    def reference(x):
        mean = x.mean(0)
        var = jnp.maximum((x * x).mean(0) - mean**2, 0.0)
        y = (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias
        return y, mean, var

    def loss(f, x):
        y, mean, var = f(x)
        return jnp.sum(jnp.sin(y)) + jnp.sum(mean * 2.0) + jnp.sum(var**2)

    ours = jax.grad(functools.partial(loss, lambda x: normalize_batch(x, scale, bias, 1e-5, None)))
    theirs = jax.grad(functools.partial(loss, reference))
    assert_close(jax.jit(ours)(x), jax.jit(theirs)(x), 1e-5)


def per_device(module_cls, v, x, dy):
    """Per-device loss, new statistics and gradients, statistics averaged over 'batch'."""
    module = module_cls(use_running_average=False, axis_name="batch", **SETTINGS)
    return grads_and_state(module, v, x, dy)


@pytest.mark.parametrize("strategy", ["pmap", "shard_map"])
def test_four_devices_match_flax(strategy):
    devices = jax.local_devices()
    assert len(devices) == 4, "tests/conftest.py sets four CPU devices"
    shape = (4, 6, 5, 5, 8)  # device, batch, H, W, C
    v = variables(shape[1:])
    x = inputs(shape)
    dy = normal(2, shape)

    def run(module_cls):
        fn = functools.partial(per_device, module_cls, v)
        if strategy == "pmap":
            return jax.pmap(fn, axis_name="batch")(x, dy)
        mesh = Mesh(np.array(devices), ("batch",))
        spec = PartitionSpec("batch")

        def body(x, dy):
            out = fn(x[0], dy[0])
            return jax.tree.map(lambda a: a[None], out)

        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec, spec), out_specs=spec))(x, dy)

    ours, theirs = run(BatchNorm), run(nn.BatchNorm)
    assert_close(ours, theirs, 1e-5)
    # The statistics are global: every device holds the same updated running averages.
    stats = ours[1]
    chex.assert_trees_all_close(
        jax.tree.map(lambda a: a[0], stats), jax.tree.map(lambda a: a[3], stats)
    )


def test_channel_sums_are_accurate():
    x = np.random.default_rng(0).standard_normal((65536, 8)).astype(np.float32) + 10.0
    got = np.asarray(channel_sums(jnp.asarray(x)))
    want = x.astype(np.float64).sum(0)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["pmap", "shard_map", "shard_map_untracked"])
def test_gradient_of_returned_statistics_over_four_devices(strategy):
    """Gradients through the global mean and variance match autodiff of `lax.pmean`."""
    from flaxcnn.models.batchnorm import normalize_batch

    x = inputs((4, 8, 5))
    scale, bias = jnp.full((5,), 1.3), jnp.full((5,), 0.1)

    def reference(x):
        mean = jax.lax.pmean(x.mean(0), "batch")
        var = jnp.maximum(jax.lax.pmean((x * x).mean(0), "batch") - mean**2, 0.0)
        y = (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias
        return y, mean, var

    def ours(x):
        return normalize_batch(x, scale, bias, 1e-5, "batch")

    def loss(f, x):
        y, mean, var = f(x)
        return jnp.sum(jnp.sin(y)) + jnp.sum(mean * 2.0) + jnp.sum(var**2)

    def run(f):
        grad = jax.grad(functools.partial(loss, f))
        if strategy == "pmap":
            return jax.pmap(grad, axis_name="batch")(x)
        mesh = Mesh(np.array(jax.local_devices()), ("batch",))
        spec = PartitionSpec("batch")
        body = jax.shard_map(
            lambda x: grad(x[0])[None],
            mesh=mesh,
            in_specs=spec,
            out_specs=spec,
            check_vma=strategy == "shard_map",
        )
        return jax.jit(body)(x)

    assert_close(run(ours), run(reference), 1e-5)


def test_float64_is_computed_in_float64():
    with jax.enable_x64(True):
        x = inputs((6, 3, 3, 4)).astype(jnp.float64)
        dy = jnp.ones_like(x)
        v = variables(x.shape)
        ours = grads_and_state(BatchNorm(use_running_average=False, **SETTINGS), v, x, dy)
        theirs = grads_and_state(nn.BatchNorm(use_running_average=False, **SETTINGS), v, x, dy)
        chex.assert_trees_all_equal_dtypes(ours, theirs)
        assert_close(ours, theirs, 1e-10)
