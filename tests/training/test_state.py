"""The train state's initialiser: compiled with cheaper options on CPU, into the same bits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxcnn import models
from flaxcnn.training import state as state_lib


@pytest.mark.parametrize(
    "arch, size", [("lenet5", 28), ("resnet20", 8), ("simple_cnn", 28), ("netresdeep", 16)]
)
def test_the_initial_state_is_the_one_plain_jit_gives(arch, size):
    """`create_state` compiles its initialiser at LLVM -O2 on CPU: every parameter,
    statistic and optimizer slot must have the bits of XLA's default (-O3) compile."""
    model = models.create(arch, num_classes=10)
    tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
    fast = state_lib.create_state(model, tx, (1, size, size, 3), seed=7)

    init_key, dropout_key = jax.random.split(jax.random.key(7))

    @jax.jit
    def plain():
        variables = model.init(
            {"params": init_key, "dropout": init_key}, jnp.zeros((1, size, size, 3)), train=False
        )
        params, stats = variables["params"], variables.get("batch_stats", {})
        return params, stats, tx.init(params), jax.random.key_data(dropout_key)

    expected = plain()
    got = (fast.params, fast.batch_stats, fast.opt_state, fast.rng)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_cheaper_options_are_for_cpu_and_yield_to_the_users_flags():
    options = state_lib.init_compiler_options
    assert options("cpu", "") == {"xla_backend_optimization_level": 2}
    assert options("cpu", "--xla_force_host_platform_device_count=4") == {
        "xla_backend_optimization_level": 2
    }
    assert options("cpu", "--xla_backend_optimization_level=3") is None
    assert options("gpu", "") is None and options("tpu", "") is None
