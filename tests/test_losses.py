import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxcnn import losses


def _random_batch(seed=0, n=64, c=10, scale=3.0):
    """Logits and integer labels, drawn with numpy (an eager jax.random call compiles a
    program for every new shape)."""
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(scale * rng.standard_normal((n, c), np.float32))
    labels = jnp.asarray(rng.integers(0, c, n, dtype=np.int32))
    return logits, labels


def test_nll_of_log_softmax_equals_optax_cross_entropy():
    logits, labels = _random_batch()
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    np.testing.assert_allclose(losses.cross_entropy(logits, labels), expected, atol=1e-6)
    log_probs = jax.nn.log_softmax(logits)
    np.testing.assert_allclose(losses.nll_loss(log_probs, labels), expected, atol=1e-6)


def test_gradients_equal_optax():
    logits, labels = _random_batch(1)
    ours = jax.grad(lambda z: losses.cross_entropy(z, labels))(logits)
    theirs = jax.grad(lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean())(
        logits
    )
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_label_smoothing_equals_optax_smoothed_targets():
    logits, labels = _random_batch(2)
    eps = 0.1
    targets = optax.smooth_labels(jax.nn.one_hot(labels, 10), eps)  # reference only
    expected = optax.softmax_cross_entropy(logits, targets).mean()
    np.testing.assert_allclose(
        losses.cross_entropy(logits, labels, label_smoothing=eps), expected, atol=1e-6
    )


def _primitives(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                names |= _primitives(inner)
    return names


def test_no_one_hot_is_built():
    """The loss gathers with the label as an index: no (batch, classes) float target."""
    logits, labels = _random_batch(3)
    primitives = _primitives(jax.make_jaxpr(losses.cross_entropy)(logits, labels).jaxpr)
    assert "gather" in primitives
    assert "eq" not in primitives  # one_hot compares labels with an iota
    one_hot = jax.make_jaxpr(lambda y: jax.nn.one_hot(y, 10))(labels).jaxpr
    assert "eq" in _primitives(one_hot)  # ... so the check above can fail


@pytest.mark.parametrize("bad", [-1, 10, 11])
def test_out_of_range_labels_give_nan_not_another_class(bad):
    logits, labels = _random_batch(5, n=4)
    assert jnp.isnan(losses.cross_entropy(logits, labels.at[2].set(bad)))


def test_finite_for_huge_logits():
    logits = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]])
    labels = jnp.array([1, 0])
    loss, grad = jax.value_and_grad(losses.cross_entropy)(logits, labels)
    assert jnp.isfinite(loss)
    chex.assert_tree_all_finite(grad)
    np.testing.assert_allclose(loss, (2e4 + 2e4 + np.log(2)) / 2, rtol=1e-6)


def test_masked_examples_contribute_nothing():
    logits, labels = _random_batch(4, n=8)
    where = jnp.array([True] * 5 + [False] * 3)
    noise = np.random.default_rng(9).standard_normal((3, 10), np.float32)
    garbage = logits.at[5:].set(jnp.asarray(noise) * 100)
    masked = losses.cross_entropy(garbage, labels, where=where)
    np.testing.assert_allclose(masked, losses.cross_entropy(logits[:5], labels[:5]), atol=1e-6)
    grad = jax.grad(lambda z: losses.cross_entropy(z, labels, where=where))(garbage)
    assert jnp.all(grad[5:] == 0)
    np.testing.assert_allclose(
        losses.accuracy(garbage, labels, where=where), losses.accuracy(logits[:5], labels[:5])
    )


def test_loss_goes_to_zero_as_true_class_probability_goes_to_one():
    """The course's point: -log p is 0 when certain and right, unbounded as p -> 0."""
    probs = jnp.array([0.5, 0.9, 0.99, 0.999999])
    log_probs = jnp.log(jnp.stack([probs, 1 - probs], axis=-1))
    per_example = jnp.array([losses.nll_loss(lp[None], jnp.array([0])) for lp in log_probs])
    assert jnp.all(jnp.diff(per_example) < 0)
    assert per_example[-1] < 1e-5

    wrong = jnp.array([1e-1, 1e-3, 1e-6, 1e-12])
    log_probs = jnp.log(jnp.stack([wrong, 1 - wrong], axis=-1))
    per_example = jnp.array([losses.nll_loss(lp[None], jnp.array([0])) for lp in log_probs])
    assert jnp.all(jnp.diff(per_example) > 0)
    np.testing.assert_allclose(per_example, -np.log(wrong), rtol=1e-5)
    assert per_example[-1] > 27  # -log(1e-12) = 27.6: no upper bound


def test_float_labels_are_rejected():
    logits, _ = _random_batch()
    with pytest.raises(TypeError, match="integer"):
        losses.cross_entropy(logits, jnp.zeros(64))


@pytest.mark.parametrize("eps", [-0.1, 1.0])
def test_bad_label_smoothing(eps):
    logits, labels = _random_batch()
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.cross_entropy(logits, labels, label_smoothing=eps)


def test_bfloat16_logits_give_float32_loss():
    logits, labels = _random_batch()
    loss = losses.cross_entropy(logits.astype(jnp.bfloat16), labels)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, losses.cross_entropy(logits, labels), rtol=2e-2)
