"""One training step and one evaluation step, written for a single device's shard.

Both run under a named data axis (`jax.pmap` or `jax.shard_map`, see `parallel.py`): the
gradient is averaged over the axis with `lax.pmean`, BatchNorm averages its statistics
over it (the model is built with the same axis name), and the metrics are summed over it.
Metrics are sums (loss x examples, correct, examples) so that they add up exactly across
steps, devices and hosts; means are taken on the host at log points.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from flaxcnn import losses
from flaxcnn.models import layers
from flaxcnn.training import evaluation
from flaxcnn.training.state import TrainState

AXIS = "batch"  # the data-parallel axis
AUX_LOSS_WEIGHT = 0.3  # GoogLeNet's auxiliary classifiers (Szegedy et al., 2015)
FIRST_NONFINITE = "first_nonfinite_step"
ALL_FINITE = float(jnp.finfo(jnp.float32).max)  # FIRST_NONFINITE when there was none

Metrics = dict[str, jax.Array]


def split_outputs(outputs: Any) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Logits and auxiliary logits (GoogLeNet in train mode returns both)."""
    if isinstance(outputs, tuple):
        logits, aux = outputs
        return logits, tuple(aux)
    return outputs, ()


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    label_smoothing: float = 0.0,
    trainable: Any = None,
) -> tuple[TrainState, Metrics]:
    """One step. `trainable` (a tree of bools like the params; --freeze-backbone) makes the
    others a fixed feature extractor: the network runs in inference mode (BatchNorm with its
    running statistics, which stay as they are; no dropout), their gradients are stopped,
    so the backward pass ends at the trained layers, and the optimizer leaves them alone."""
    labels = batch["label"]
    frozen = trainable is not None
    # A different dropout key on every step and on every device.
    key = jax.random.wrap_key_data(state.rng)
    key = jax.random.fold_in(jax.random.fold_in(key, state.step), lax.axis_index(AXIS))

    def loss_fn(params):
        if frozen:
            params = jax.tree.map(lambda p, t: p if t else lax.stop_gradient(p), params, trainable)
        outputs, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=not frozen,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )
        logits, aux = split_outputs(outputs)
        loss = losses.cross_entropy(logits, labels, label_smoothing)
        for aux_logits in aux:
            loss += AUX_LOSS_WEIGHT * losses.cross_entropy(aux_logits, labels, label_smoothing)
        batch_stats = state.batch_stats if frozen else updates.get("batch_stats", {})
        return loss, (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if frozen:  # the frozen gradients are zeros: nothing to average
        grads = jax.tree.map(lambda g, t: lax.pmean(g, AXIS) if t else g, grads, trainable)
    else:
        grads = lax.pmean(grads, AXIS)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    n = jnp.float32(labels.shape[0])
    metrics = {
        "loss": loss * n,
        "correct": jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32),
        "count": n,
    }
    metrics = lax.psum(metrics, AXIS)
    # Kept on device so that a NaN is caught (and named) at the next log point without a
    # host sync on every step: the step number where it happened, else ALL_FINITE (finite,
    # so that the running sums stay JSON-serialisable in checkpoints).
    bad = jnp.where(jnp.isfinite(loss), ALL_FINITE, state.step.astype(jnp.float32))
    metrics[FIRST_NONFINITE] = lax.pmin(bad, AXIS)
    return state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> Metrics:
    """Sums over the real examples of the batch: padding (mask False) counts for nothing."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = evaluation.logits(state.apply_fn, variables, batch["image"])
    metrics = evaluation.example_metrics(logits, batch["label"])
    return lax.psum(evaluation.masked_sums(metrics, batch["mask"]), AXIS)


def batch_norm_step(state: TrainState, batch: dict[str, jax.Array]) -> Any:
    """Every BatchNorm layer's statistics of this (global) batch, with the current weights.

    The network runs in train mode, as in a step, so each layer normalises with its batch
    statistics (averaged over the data axis) and sees the input the weights give it now.
    Flax's BatchNorm updates `ra = m * ra + (1 - m) * batch_stat`; starting from zeros,
    one call leaves `(1 - m) * batch_stat`, which gives the batch's own mean and variance.
    """
    zeros = jax.tree.map(jnp.zeros_like, state.batch_stats)
    _, updates = state.apply_fn(
        {"params": state.params, "batch_stats": zeros},
        batch["image"],
        train=True,
        rngs={"dropout": jax.random.key(0)},  # dropout before a BatchNorm, as in training
        mutable=["batch_stats"],
    )
    return jax.tree.map(lambda s: s / (1.0 - layers.TORCH_BN_MOMENTUM), updates["batch_stats"])
