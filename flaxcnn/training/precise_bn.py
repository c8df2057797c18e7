"""Precise BatchNorm: population statistics recomputed with the current weights.

Evaluation normalises with BatchNorm's running averages, which trail the weights by the
last few dozen steps; early in training, while the weights move fast, they describe a
network that no longer exists, and the test metrics are garbage (the README's main command
read 10% test accuracy at test losses up to 332,013 for its first four epochs). Before an
evaluation, the trainer runs the network in train mode over a few fixed training batches
(without augmentation) and replaces the running averages by the statistics of those
batches (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021): the mean of the batch
means, and the mean of the batch variances plus the variance of the batch means. The
parameters are untouched; the checkpoint saved after the evaluation holds these
statistics, so `flaxcnn.evaluate` reproduces the logged numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from flaxcnn.training import parallel


def population_statistics(per_batch: list[Any]) -> Any:
    """Combine BatchNorm statistics (trees of `{"mean", "var"}` nodes) of equal-sized batches.

    The mean is the mean of the batch means; the variance E[var_b] + Var[mean_b] (the law of
    total variance), computed in float64 and returned as float32.
    """
    flat = [
        {jax.tree_util.keystr(p): np.asarray(v, np.float64) for p, v in leaves_with_paths(t)}
        for t in per_batch
    ]
    stacked = {k: np.stack([f[k] for f in flat]) for k in flat[0]}
    combined = {}
    for key, values in stacked.items():
        if key.endswith("['mean']"):
            combined[key] = values.mean(0)
        elif key.endswith("['var']"):
            means = stacked[key[: -len("['var']")] + "['mean']"]
            combined[key] = values.mean(0) + means.var(0)
        else:
            raise ValueError(f"unexpected BatchNorm statistic {key}")
    return jax.tree_util.tree_map_with_path(
        lambda p, _: combined[jax.tree_util.keystr(p)].astype(np.float32), per_batch[0]
    )


def leaves_with_paths(tree: Any) -> list[tuple[Any, Any]]:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def recompute(
    par: parallel.DataParallel, dstate: Any, batches: Iterable[dict[str, np.ndarray]]
) -> Any:
    """`dstate` with its BatchNorm statistics recomputed over `batches` (placed state in,
    placed state out). A network without BatchNorm, or no batch, leaves it as it is."""
    if not jax.tree.leaves(dstate.batch_stats):
        return dstate
    per_batch = [par.get_state(par.batch_norm_step(dstate, par.put_batch(b))) for b in batches]
    if not per_batch:
        return dstate
    return dstate.replace(batch_stats=par.put_state(population_statistics(per_batch)))
