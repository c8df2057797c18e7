"""The train state: everything a step changes and a checkpoint must keep."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from flaxcnn import xla_flags


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


def compile_once(fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` (no arguments) compiled for a single call, with flaxcnn's options for that."""
    options = xla_flags.compile_once_options(jax.default_backend())
    return jax.jit(fn).lower().compile(compiler_options=options)
