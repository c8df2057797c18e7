"""The classification loss as the course writes it: log-softmax, then negative log-likelihood.

`nll_loss` reads off the log-probability of the true class with the integer label as an
index (`take_along_axis`): no one-hot vector is ever built. The loss of one example is
`-log p(true class)`: 0 when the network is certain and right, growing without bound as
the probability it gives the true class falls to 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _mean(per_example: jax.Array, where: jax.Array | None) -> jax.Array:
    if where is None:
        return jnp.mean(per_example)
    where = where.astype(per_example.dtype)
    # Padded evaluation examples (where=False) add nothing to the sum nor to the count.
    return jnp.sum(per_example * where) / jnp.maximum(jnp.sum(where), 1.0)


def true_class_log_prob(log_probs: jax.Array, labels: jax.Array) -> jax.Array:
    """log p(label) for each example: (..., C) and (...) integer labels -> (...)."""
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    # A label outside [0, C) must not silently pick a class (take_along_axis would wrap -1
    # around to C-1): route it past the end, where the gather fills NaN.
    index = jnp.where(labels < 0, log_probs.shape[-1], labels).astype(jnp.int32)
    return jnp.take_along_axis(
        log_probs, index[..., None], axis=-1, mode="fill", fill_value=jnp.nan
    )[..., 0]


def nll_loss(log_probs: jax.Array, labels: jax.Array, where: jax.Array | None = None) -> jax.Array:
    """Mean negative log-likelihood of integer `labels` under `log_probs` (..., C).

    `where` (boolean, shape of `labels`) masks examples out, e.g. the padding of the last
    evaluation batch; the mean is over the examples kept.
    """
    return _mean(-true_class_log_prob(log_probs, labels), where)


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    label_smoothing: float = 0.0,
    where: jax.Array | None = None,
) -> jax.Array:
    """`nll_loss(log_softmax(logits), labels)`, computed in float32 for stability.

    With `label_smoothing=e` the target puts 1-e on the true class and e/C on every class,
    which is `(1-e) * NLL + e * mean over classes of -log p`; still no one-hot.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    per_example = -true_class_log_prob(log_probs, labels)
    if label_smoothing:
        uniform = -jnp.mean(log_probs, axis=-1)
        per_example = (1.0 - label_smoothing) * per_example + label_smoothing * uniform
    return _mean(per_example, where)


def accuracy(logits: jax.Array, labels: jax.Array, where: jax.Array | None = None) -> jax.Array:
    """Fraction of (kept) examples whose highest logit is the true class."""
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return _mean(correct, where)
