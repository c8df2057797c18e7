"""Precise BatchNorm: statistics recomputed with the current weights before evaluation."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from flaxcnn import evaluate
from flaxcnn.models import layers
from flaxcnn.training import TrainConfig, parallel, precise_bn, steps, train
from flaxcnn.training.state import create_state


def test_population_statistics_is_the_law_of_total_variance():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, (16, 5)) * (1 + i) for i in range(4)]
    per_batch = [{"bn": {"mean": b.mean(0), "var": b.var(0)}} for b in batches]
    combined = precise_bn.population_statistics(per_batch)
    everything = np.concatenate(batches)
    np.testing.assert_allclose(combined["bn"]["mean"], everything.mean(0), rtol=1e-6)
    np.testing.assert_allclose(combined["bn"]["var"], everything.var(0), rtol=1e-6)
    assert combined["bn"]["var"].dtype == np.float32


class OneBatchNorm(nn.Module):
    """x -> BatchNorm (the models' own factory) -> a classifier: its statistics are x's."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        x = layers.batch_norm(train, axis_name=self.axis_name)(x)
        return nn.Dense(3)(x.mean((1, 2)))


@pytest.mark.parametrize("strategy", ["pmap", "shard_map"])
def test_batch_norm_step_gives_the_global_batchs_statistics(strategy):
    """Over 4 devices, each holding a quarter of the batch: the statistics of all of it."""
    state = create_state(OneBatchNorm(), optax.sgd(0.1), (1, 4, 4, 2), seed=0)
    state = state.replace(apply_fn=OneBatchNorm(axis_name=steps.AXIS).apply)
    par = parallel.make(strategy)
    rng = np.random.default_rng(1)
    images = rng.normal(2.0, 3.0, (8, 4, 4, 2)).astype(np.float32)
    batch = {"image": images, "label": np.zeros(8, np.int32)}
    stats = par.get_state(par.batch_norm_step(par.put_state(state), par.put_batch(batch)))
    (name,) = stats
    np.testing.assert_allclose(stats[name]["mean"], images.mean((0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(stats[name]["var"], images.var((0, 1, 2)), rtol=1e-4)

    # recompute() puts the combination of several batches into the placed state.
    placed = precise_bn.recompute(par, par.put_state(state), [batch, batch])
    np.testing.assert_allclose(
        par.get_state(placed.batch_stats)[name]["mean"], images.mean((0, 1, 2)), rtol=1e-5
    )


@pytest.mark.slow
def test_first_epoch_test_metrics_are_meaningful_and_evaluate_reproduces_them(
    digits_data_dir, tmp_path
):
    """ResNet-20 after one epoch of 10 steps of 128: with the running averages, evaluation sees a
    network of ~10 steps ago (test accuracy near chance); recomputed, the real one."""
    common = dict(
        arch="resnet20", image_size=8, epochs=1, batch_size=128, seed=0, progress=False,
        data_dir=str(digits_data_dir),
    )  # fmt: skip
    precise = train(TrainConfig(**common, workdir=str(tmp_path / "p")), out=lambda line: None)
    running = train(
        TrainConfig(**common, workdir=str(tmp_path / "r"), precise_bn=0), out=lambda line: None
    )
    assert precise["accuracy"] > running["accuracy"] + 0.2, (precise, running)
    assert precise["loss"] < running["loss"]
    # The checkpoint holds the recomputed statistics: evaluate gives the logged numbers.
    result = evaluate.evaluate_workdir(tmp_path / "p")
    assert result["top1"] == pytest.approx(precise["accuracy"])
    assert result["loss"] == pytest.approx(precise["loss"], rel=1e-5)


class NoBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        return nn.Dense(3)(x)


def test_a_network_without_batch_norm_is_left_alone():
    state = create_state(NoBatchNorm(), optax.sgd(0.1), (1, 4), seed=0)
    assert not jax.tree.leaves(state.batch_stats)

    class NoStep:
        def batch_norm_step(self, *args):
            raise AssertionError("no BatchNorm, no statistics step")

    assert precise_bn.recompute(NoStep(), state, [{"image": np.zeros((1, 4))}]) is state
