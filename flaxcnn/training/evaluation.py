"""Evaluation, one implementation: a predict function and the metrics computed from it.

`logits(apply_fn, variables, images)` is the network in eval mode (auxiliary heads
dropped); `example_metrics(logits, labels)` scores every example (correct, in the top 5,
negative log-likelihood). The trainer's `steps.eval_step` sums them over the real examples
of a batch and the devices; `flaxcnn.evaluate` keeps them per example for its confusion
matrix and per-class accuracy. So the test accuracy a run logs and the one
`flaxcnn.evaluate` reports for that checkpoint are the same computation.

Top-5 accuracy is computed only where there are more than 5 classes: with 5 or fewer it is
always 1 and says nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from flaxcnn import losses

TOP_K = 5


def logits(apply_fn: Callable, variables: Mapping[str, Any], images: jax.Array) -> jax.Array:
    outputs = apply_fn(variables, images, train=False)
    return outputs[0] if isinstance(outputs, tuple) else outputs


def has_top5(num_classes: int) -> bool:
    return num_classes > TOP_K


def example_metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Per example: `correct` (top-1), `correct_top5` (only with more than 5 classes) and
    `loss` (the negative log-likelihood of the true class, in float32)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    out = {
        "correct": jnp.argmax(logits, -1) == labels,
        "loss": -losses.true_class_log_prob(log_probs, labels),
    }
    if has_top5(logits.shape[-1]):
        top = jax.lax.top_k(logits, TOP_K)[1]
        out["correct_top5"] = jnp.any(top == labels[:, None], axis=-1)
    return out


def masked_sums(metrics: Mapping[str, jax.Array], mask: jax.Array) -> dict[str, jax.Array]:
    """Sums over the examples whose mask is True (padding counts for nothing), and `count`."""
    weight = mask.astype(jnp.float32)
    sums = {k: jnp.sum(jnp.where(mask, v.astype(jnp.float32), 0.0)) for k, v in metrics.items()}
    return {**sums, "count": jnp.sum(weight)}


def means(sums: Mapping[str, float]) -> dict[str, float]:
    """Loss, accuracy (and top-5 accuracy) from summed metrics."""
    count = max(sums["count"], 1.0)
    out = {"loss": sums["loss"] / count, "accuracy": sums["correct"] / count}
    if "correct_top5" in sums:
        out["top5_accuracy"] = sums["correct_top5"] / count
    return out
