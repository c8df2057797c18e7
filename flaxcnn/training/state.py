"""The train state: everything a step changes and a checkpoint must keep."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state


class TrainState(train_state.TrainState):
    """Flax's TrainState plus BatchNorm statistics and the base random key.

    `rng` holds raw key data (uint32) so that it checkpoints like any other array; each
    step derives its dropout key from it, the step number and the device index.
    """

    batch_stats: Any = struct.field(default_factory=dict)
    rng: jax.Array = struct.field(default=None)


def create_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    input_shape: tuple[int, ...],
    seed: int,
) -> TrainState:
    """Initialise parameters (float32) and optimizer state on the host's default device."""
    init_key, dropout_key = jax.random.split(jax.random.key(seed))

    def init():
        variables = model.init(
            {"params": init_key, "dropout": init_key}, jnp.zeros(input_shape), train=False
        )
        return TrainState.create(
            apply_fn=model.apply,
            params=variables["params"],
            batch_stats=variables.get("batch_stats", {}),
            tx=tx,
            rng=jax.random.key_data(dropout_key),
        )

    return compile_once(init)()


# XLA:CPU compiles with LLVM at -O3. The initialiser runs once and is mostly threefry's
# integer hashing of random bits: at -O2 it compiles 2-3x faster (resnet20: 4.6 -> 1.8 s,
# googlenet: 16 -> 11 s on a 2-core Xeon) into the same bits, which tests/training/
# test_state.py checks. The steps, which run thousands of times, keep XLA's default.
CPU_INIT_OPTIONS = {"xla_backend_optimization_level": 2}


def init_compiler_options(backend: str, xla_flags: str) -> dict[str, Any] | None:
    """`CPU_INIT_OPTIONS` on CPU, less any option the user's XLA_FLAGS set themselves."""
    if backend != "cpu":
        return None
    return {k: v for k, v in CPU_INIT_OPTIONS.items() if k not in xla_flags} or None


def compile_once(fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` (no arguments) compiled for a single call, with `init_compiler_options`."""
    options = init_compiler_options(jax.default_backend(), os.environ.get("XLA_FLAGS", ""))
    return jax.jit(fn).lower().compile(compiler_options=options)
