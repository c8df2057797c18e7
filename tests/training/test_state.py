"""The train state's initialiser: compiled with cheaper options on CPU, into the same bits."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from flaxcnn import models, xla_flags
from flaxcnn.training import state as state_lib


@pytest.mark.parametrize(
    "arch, size",
    # Each compiles its initialiser twice, once at XLA's -O3 (3-5 s). The two draw from
    # every initialiser the other CNNs here use but GoogLeNet's plain normal: variance
    # scaling with LeCun's scale (their dense layers; all of LeNet-5's layers) and with
    # He's, fan-out and fan-in (the convolutions, the simple CNN's too), BatchNorm's
    # constants and the optimizer's zeros. The quick lane keeps netresdeep: convolutions,
    # a dense layer and BatchNorm.
    [pytest.param("resnet20", 8, marks=pytest.mark.slow), ("netresdeep", 16)],
)  # fmt: skip
def test_the_initial_state_is_the_one_plain_jit_gives(arch, size, monkeypatch):
    """`create_state` compiles its initialiser at LLVM -O2 on CPU: every parameter,
    statistic and optimizer slot must have the bits of XLA's default (-O3) compile."""
    model = models.create(arch, num_classes=10)
    tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
    fast = state_lib.create_state(model, tx, (1, size, size, 3), seed=7)

    # The same initialiser compiled with XLA's defaults (FLAXCNN_XLA_DEFAULTS=0).
    monkeypatch.setenv(xla_flags.OPT_OUT, "0")
    plain = state_lib.create_state(model, tx, (1, size, size, 3), seed=7)
    expected = (plain.params, plain.batch_stats, plain.opt_state, plain.rng)
    got = (fast.params, fast.batch_stats, fast.opt_state, fast.rng)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_cheaper_options_are_for_cpu_and_yield_to_the_users_flags():
    def options(backend, flags, **environ):
        return xla_flags.compile_once_options(backend, {"XLA_FLAGS": flags, **environ})

    assert options("cpu", "") == {"xla_backend_optimization_level": 2}
    assert options("cpu", "--xla_force_host_platform_device_count=4") == {
        "xla_backend_optimization_level": 2
    }
    assert options("cpu", "--xla_backend_optimization_level=3") is None
    assert options("cpu", "", FLAXCNN_XLA_DEFAULTS="0") is None
    assert options("gpu", "") is None and options("tpu", "") is None
