"""The train step in isolation: data parallelism, auxiliary losses, optimizer details."""

import chex
import jax
import numpy as np
import optax
import pytest

from flaxcnn import models
from flaxcnn.models import summary
from flaxcnn.training import optim, parallel, steps
from flaxcnn.training.build import Network, create_train_state
from flaxcnn.training.state import create_state


def make_state(arch="netresdeep", size=8, lr=0.1, **options):
    """A train state from the trainer's builder; by default a small BatchNorm network that
    compiles in seconds."""
    if arch == "netresdeep":
        options = {"n_chans": 8, "n_blocks": 2, **options}
    network = Network(arch, num_classes=10, image_size=size, in_channels=3, options=options)
    tx = optim.make_optimizer("sgd", optax.constant_schedule(lr), weight_decay=5e-4)
    return create_train_state(network, tx, seed=0)


def batch(n=16, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, size, size, 3)).astype(np.float32),
        "label": rng.integers(0, 10, n).astype(np.int32),
    }


def one_device_step(state, b):
    """The same step with a data axis of size 1: the single-device reference."""
    return jax.jit(
        jax.vmap(steps.train_step, in_axes=(None, None), out_axes=None,
                 axis_name=steps.AXIS, axis_size=1)
    )(state, b)  # fmt: skip


@pytest.mark.parametrize("strategy", parallel.STRATEGIES)
def test_four_devices_step_equals_one_device_step(strategy):
    """Averaged gradients, global BatchNorm statistics, summed metrics: as on one device."""
    assert jax.device_count() == 4
    state, b = make_state(), batch()
    ref_state, ref_metrics = one_device_step(state, b)

    par = parallel.make(strategy)
    new, metrics = par.train_step(par.put_state(state), par.put_batch(b))
    host = par.get_state(new)
    chex.assert_trees_all_close(host.params, ref_state.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(host.batch_stats, ref_state.batch_stats, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(host.opt_state, ref_state.opt_state, rtol=1e-5, atol=1e-6)
    got = par.get_metrics(metrics)
    assert got["count"] == 16
    np.testing.assert_allclose(got["loss"], float(ref_metrics["loss"]), rtol=1e-5)
    assert got["correct"] == float(ref_metrics["correct"])
    assert got[steps.FIRST_NONFINITE] == steps.ALL_FINITE


def test_every_device_holds_the_same_state_after_a_step():
    state, b = make_state(), batch()
    par = parallel.make("pmap")
    new, _ = par.train_step(par.put_state(state), par.put_batch(b))
    for leaf in jax.tree.leaves((new.params, new.batch_stats)):
        replicas = np.asarray(leaf)
        np.testing.assert_array_equal(replicas, np.broadcast_to(replicas[0], replicas.shape))


def test_eval_step_counts_only_unmasked_examples():
    state = make_state()
    b = batch(8)
    masked = {**b, "mask": np.array([True] * 5 + [False] * 3)}
    par = parallel.make("pmap")
    dstate = par.put_state(state)
    got = par.get_metrics(par.eval_step(dstate, par.put_batch(masked)))
    assert got["count"] == 5
    first5 = {k: np.concatenate([v[:5], v[:3]]) for k, v in b.items()}
    first5["mask"] = np.array([True] * 5 + [False] * 3)
    again = par.get_metrics(par.eval_step(dstate, par.put_batch(first5)))
    np.testing.assert_allclose(got["loss"], again["loss"], rtol=1e-5)


def test_nonfinite_loss_is_reported_with_its_step():
    model = models.create("lenet5", num_classes=10)
    state = create_state(model, optax.sgd(0.1), (1, 32, 32, 1), 0).replace(apply_fn=model.apply)
    b = {"image": np.full((4, 32, 32, 1), np.nan, np.float32), "label": np.zeros(4, np.int32)}
    _, metrics = one_device_step(state, b)
    assert float(metrics[steps.FIRST_NONFINITE]) == 1.0


def test_weight_decay_only_on_kernels():
    params = summary.init_shapes(models.create("resnet20"), (1, 8, 8, 3))["params"]
    mask = optim.decay_mask(params)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat["['conv1']['kernel']"] is True
    assert flat["['fc']['kernel']"] is True
    assert flat["['fc']['bias']"] is False
    assert flat["['bn1']['scale']"] is False and flat["['bn1']['bias']"] is False


def test_schedules():
    cosine = optim.make_schedule("cosine", 1.0, total_steps=100, warmup_steps=10)
    assert float(cosine(0)) == 0.0 and float(cosine(10)) == pytest.approx(1.0)
    assert float(cosine(55)) == pytest.approx(0.5, abs=1e-6) and float(cosine(100)) < 1e-6
    step = optim.make_schedule("step", 1.0, total_steps=100, warmup_steps=0)
    assert [float(step(s)) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )
    assert float(optim.make_schedule("constant", 0.3, 100, 0)(77)) == pytest.approx(0.3)
    assert optim.scaled_lr(0.1, 512) == pytest.approx(0.2)
    # Linear down to a batch of 64; smaller batches take 64's rate (1: linear all the way,
    # as runs from before the floor resume).
    assert optim.scaled_lr(0.1, 64) == optim.scaled_lr(0.1, 8) == pytest.approx(0.025)
    assert optim.scaled_lr(0.1, 8, min_batch=1) == pytest.approx(0.003125)
