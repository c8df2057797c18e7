"""`--freeze-backbone` at the level of the step: what trains, in which mode, on any devices.

No torch needed: the frozen network is a CIFAR ResNet with its own initialisation and
BatchNorm statistics set away from their initial values, stepped over 4 CPU devices under
pmap and shard_map with the trainer's own optimizer (SGD with weight decay, the decay being
what would move a parameter that has no gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxcnn import losses, models
from flaxcnn.cli import UsageError
from flaxcnn.models import summary
from flaxcnn.training import freeze, optim, parallel
from flaxcnn.training.build import Network, create_train_state

DEEP = ("googlenet", "plain110", "resnet101", "resnet110", "resnet152")  # 0.8-1 s each


@pytest.mark.parametrize(
    "arch", [pytest.param(a, marks=[pytest.mark.slow] if a in DEEP else []) for a in models.names()]
)
def test_every_architecture_names_its_classifier(arch):
    spec = models.get_spec(arch)
    network = Network(arch, 7, max(spec.min_size, 32 if spec.input_size <= 64 else 64), 3)
    params = summary.init_shapes(network.create(), network.input_shape())["params"]
    heads = freeze.head_layers(params, spec.classifier, 7)
    assert len(heads) == 1
    mask = freeze.trainable_mask(params, heads)
    leaves = jax.tree_util.tree_flatten_with_path(mask)[0]
    trained = [jax.tree_util.keystr(path) for path, trains in leaves if trains]
    assert (
        len(trained) == 2 and trained[0].endswith("['bias']") and trained[1].endswith("['kernel']")
    )


def param_shapes(network: Network):
    return summary.init_shapes(network.create(), network.input_shape())["params"]


def test_auxiliary_heads_and_missing_layers_are_refused():
    googlenet = Network("googlenet", 7, 64, 3, options={"aux_logits": True})
    with pytest.raises(UsageError, match="leave out aux_logits=true"):
        freeze.trainable(googlenet, param_shapes(googlenet), [])
    resnet = Network("resnet20", 7, 32, 3)
    with pytest.raises(UsageError, match=r"conv1/kernel cannot come from --init-from"):
        freeze.trainable(resnet, param_shapes(resnet), ["['conv1']['kernel']", "['fc']['kernel']"])
    # A new classifier (another number of classes) is fine: it is the layer that trains.
    fresh = ["['fc']['kernel']", "['fc']['bias']"]
    params = param_shapes(resnet)
    mask = freeze.trainable(resnet, params, fresh)
    assert jax.tree.structure(mask) == jax.tree.structure(params)  # an entry per parameter
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    assert all(type(trains) is bool for _, trains in flat)
    assert {jax.tree_util.keystr(path) for path, trains in flat if trains} == set(fresh)


def moved_statistics(state):
    """The state with BatchNorm statistics away from 0 and 1, as after training."""
    rng = np.random.default_rng(0)

    def move(path, x):
        name = jax.tree_util.keystr(path)
        if name.endswith("['var']"):
            return (x * rng.uniform(0.5, 2.0, x.shape)).astype(x.dtype)
        return (x + rng.normal(0.0, 0.3, x.shape)).astype(x.dtype)

    return state.replace(batch_stats=jax.tree_util.tree_map_with_path(move, state.batch_stats))


@pytest.mark.parametrize("strategy", parallel.STRATEGIES)
def test_a_frozen_step_trains_only_the_classifier_in_inference_mode(strategy):
    network = Network("resnet20", 10, 16, 3)
    mask = freeze.trainable(network, param_shapes(network), [])
    schedule = optax.constant_schedule(0.5)
    tx = freeze.mask_optimizer(optim.make_optimizer("sgd", schedule, weight_decay=0.1), mask)
    state = moved_statistics(create_train_state(network, tx, seed=0))
    rng = np.random.default_rng(1)
    batch = {
        "image": rng.standard_normal((8, 16, 16, 3)).astype(np.float32),
        "label": rng.integers(0, 10, 8).astype(np.int32),
    }
    # The loss the frozen step reports is the network's in inference mode (running
    # statistics, not the batch's): computed here on the whole batch at once.
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = network.create().apply(variables, jnp.asarray(batch["image"]), train=False)
    expected_loss = float(losses.cross_entropy(logits, jnp.asarray(batch["label"])))

    par = parallel.make(strategy, trainable=mask)
    dstate = par.put_state(state)
    for _ in range(2):
        dstate, metrics = par.train_step(dstate, par.put_batch(batch))
        if _ == 0:
            first = par.get_metrics(metrics)
    after = par.get_state(dstate)
    assert first["loss"] / first["count"] == pytest.approx(expected_loss, rel=1e-5)

    before_flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    after_flat = jax.tree.leaves(after.params)
    mask_flat = jax.tree.leaves(mask)
    for (path, old), new, trains in zip(before_flat, after_flat, mask_flat, strict=True):
        name = jax.tree_util.keystr(path)
        if trains:
            assert not np.array_equal(np.asarray(old), new), name
        else:  # decay, momentum and the update all left it alone: the same bits
            np.testing.assert_array_equal(np.asarray(old), new, err_msg=name)
    stats = zip(jax.tree.leaves(state.batch_stats), jax.tree.leaves(after.batch_stats), strict=True)
    for old, new in stats:
        np.testing.assert_array_equal(np.asarray(old), new)
    # The optimizer keeps momentum only for what trains.
    kept = sum(x.size for x in jax.tree.leaves(after.opt_state) if np.ndim(x) > 0)
    assert kept == 64 * 10 + 10
