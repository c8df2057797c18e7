"""What the model tests share: a fast initialisation key, numpy-drawn inputs, and the
rounding of a published multiply-add figure."""

import jax
import jax.numpy as jnp
import numpy as np

# Initialisers compile several times faster from a random-bit-generator key than threefry.
KEY = jax.random.key(0, impl="rbg")


def normal(shape, seed=0, offset=0.0) -> jax.Array:
    """`offset + N(0, 1)` float32 values, drawn with numpy: an eager `jax.random` call
    compiles a program for every new shape."""
    z = np.random.default_rng(seed).standard_normal(shape, np.float32)
    return jnp.asarray(np.float32(offset) + z)


def published_bound(figure: float) -> float:
    """Half a unit in the last decimal of a published GMACs figure, in multiply-adds: a
    figure rounded to 1.814 stands for 1.8135e9..1.8145e9, one rounded to 15.47 for
    15.465e9..15.475e9. Our counts are exact, so they must fall inside that rounding."""
    decimals = len(repr(figure).partition(".")[2])
    return 0.5 * 10.0**-decimals * 1e9
