"""Properties every registered architecture must have, checked for all of them."""

import functools
import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from model_testing import normal, published_bound

from flaxcnn import models
from flaxcnn.models import summary
from flaxcnn.training.state import compile_once

NAMES = models.names()
# torchvision's published counts (the `reference` fixture's file), one test each.
REFERENCE = pathlib.Path(__file__).parents[1] / "reference" / "torchvision.json"
PUBLISHED_PARAMS = list(json.loads(REFERENCE.read_text())["params"])


def small_size(spec: models.ModelSpec) -> int:
    """The smallest convenient input: 32 where the network allows it."""
    return max(32, spec.min_size + (-spec.min_size) % 8)


NOISE_PERIOD = 1_000_003  # a prime, so that the repeats line up with no layer's shape


@functools.cache
def unit_noise() -> np.ndarray:
    """Uniform noise with mean 0 and variance 1, drawn once: filling VGG's 130M weights from
    it costs a copy, not 130M draws."""
    u = np.random.default_rng(0).random(NOISE_PERIOD, np.float32)
    return (u - np.float32(0.5)) * np.float32(np.sqrt(12.0))


def he_variables(model, shape, seed=0):
    """He-scaled random weights in the model's exact variable shapes, without compiling.

    Running each network's own init would compile a second large program per model; these
    checks only need realistic weights (variance 2 / fan-in, BatchNorm at its initial
    values), and `model.init` is exercised elsewhere (tests/training/test_state.py).
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "var" in name or "scale" in name:
            return np.ones(leaf.shape, np.float32)
        if leaf.ndim < 2:
            return np.zeros(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1]))
        noise = np.resize(np.roll(unit_noise(), rng.integers(NOISE_PERIOD)), leaf.shape)
        return noise * np.float32(np.sqrt(2 / fan_in))

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def small_model(name):
    """A 7-class model, weights and a batch of 2 at its smallest convenient input size."""
    spec = models.get_spec(name)
    size = small_size(spec)
    model = models.create(name, num_classes=7, **spec.small_input_options)
    x = normal((2, size, size, spec.in_channels))
    return model, he_variables(model, x.shape), x


# Whole-network checks of the deepest networks (and GoogLeNet) run in the slow lane; the quick
# lane keeps at least one network of every family.
# (VGG: the dropout test below runs its whole forward pass; bottlenecks: test_resnet.py.)
QUICK_FORWARD = ("lenet5", "netresdeep", "alexnet", "resnet18", "resnet20")
DEEP = ("googlenet", "resnet101", "resnet110", "resnet152", "plain110")


def check_forward(case: chex.TestCase, name: str) -> None:
    model, variables, x = small_model(name)
    logits = case.variant(lambda v, x: model.apply(v, x, train=False))(variables, x)
    chex.assert_shape(logits, (2, 7))
    chex.assert_tree_all_finite(logits)


class TestForward(chex.TestCase):
    """chex variants: the same forward pass traced under jit and run op by op."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*QUICK_FORWARD)
    def test_output_shape_and_finite(self, name):
        check_forward(self, name)


@pytest.mark.slow
class TestForwardOthers(chex.TestCase):
    """The same for every other registered network."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*(n for n in NAMES if n not in QUICK_FORWARD + DEEP))
    def test_output_shape_and_finite(self, name):
        check_forward(self, name)


@pytest.mark.slow
class TestForwardDeep(chex.TestCase):
    """The deepest networks, compiled only: op by op, the deepest ResNets and plain nets run
    their shallower siblings' blocks (above), only more of them, and GoogLeNet its Inception
    block (tests/models/test_inception.py) between plain convolutions and pools."""

    @chex.variants(with_jit=True)
    @parameterized.parameters(*DEEP)
    def test_output_shape_and_finite(self, name):
        check_forward(self, name)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if n in DEEP else []) for n in NAMES]
)
def test_params_are_float32_under_bfloat16_compute(name):
    spec = models.get_spec(name)
    model = models.create(name, dtype=jnp.bfloat16, **spec.small_input_options)
    shapes = summary.init_shapes(model, (1, small_size(spec), small_size(spec), 3))
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(shapes["params"])}
    assert dtypes == {jnp.dtype(jnp.float32)}
    out = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False),
        {k: v for k, v in shapes.items() if k != "intermediates"},
        jax.ShapeDtypeStruct((1, small_size(spec), small_size(spec), 3), jnp.float32),
    )
    assert out.dtype == jnp.bfloat16


@pytest.mark.parametrize("name", NAMES)
class TestEveryModel:
    def test_too_small_input_names_the_minimum(self, name):
        spec = models.get_spec(name)
        if spec.min_size <= 1:
            pytest.skip("works at any size")
        model = models.create(name)
        side = spec.min_size - 1
        with pytest.raises(ValueError, match=f"at least {spec.min_size}x{spec.min_size}"):
            summary.init_shapes(model, (1, side, side, spec.in_channels))
        # ... and the minimum itself works.
        summary.init_shapes(model, (1, spec.min_size, spec.min_size, spec.in_channels))


@pytest.mark.parametrize("published_name", PUBLISHED_PARAMS)
def test_parameter_counts_match_torchvision(reference, published_name):
    expected = reference["params"][published_name]
    name, options = published_name, {}
    if name == "googlenet_aux_logits":
        name, options = "googlenet", {"aux_logits": True}
    model = models.create(name, num_classes=1000, **options)
    got = summary.count_params(model, (1, 224, 224, 3))
    assert got == expected, f"{name}: {got:,} parameters, torchvision has {expected:,}"


def test_course_parameter_counts(reference):
    other = reference["other"]
    lenet = models.create("lenet5", num_classes=10)
    assert summary.count_params(lenet, (1, 32, 32, 1)) == other["lenet5_10_classes_params"]
    # MNIST's 28x28 digits padded by 2 are the paper's 32x32: same network, same count.
    lenet28 = models.create("lenet5", num_classes=10, c1_padding=2)
    assert summary.count_params(lenet28, (1, 28, 28, 1)) == other["lenet5_10_classes_params"]
    deep = models.create("netresdeep", num_classes=10, n_chans=32, n_blocks=10)
    assert (
        summary.count_params(deep, (1, 32, 32, 3))
        == other["netresdeep_32chans_10blocks_10_classes_params"]
    )


def test_vgg_and_alexnet_macs_match_torchvision(reference):
    for name in ("vgg16", "alexnet"):
        macs = summary.total_macs(models.create(name), (1, 224, 224, 3))
        published = reference["gmacs"][name]
        assert abs(macs - published * 1e9) <= published_bound(published), (name, macs)


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"Did you mean .*vgg16") as err:
        models.create("vgg61")
    assert "lenet5" in str(err.value)  # the full list


def test_unknown_option_is_rejected():
    with pytest.raises(ValueError, match="no option 'depth'"):
        models.create("vgg11", depth=3)
    with pytest.raises(ValueError, match="num_classes"):
        models.create("lenet5", num_classes=0)


def _stats_and_output(model, variables, x, train, rng=0):
    out, updates = model.apply(
        variables,
        x,
        train=train,
        rngs={"dropout": jax.random.key(rng)},
        mutable=["batch_stats"],
    )
    return out, updates.get("batch_stats", {})


@pytest.mark.parametrize(
    "name, options",
    [("netresdeep", {"n_blocks": 2}),
     pytest.param("vgg11_bn", {"dropout_rate": 0.0, "hidden_width": 64},
                  marks=pytest.mark.slow)],
)  # fmt: skip
def test_batchnorm_statistics_change_only_in_train_mode(name, options):
    model = models.create(name, num_classes=10, **options)
    x = normal((4, 32, 32, 3), offset=3.0)
    variables = he_variables(model, x.shape)

    @jax.jit  # one program for the three passes
    def run(variables, x):
        eval_out, eval_stats = _stats_and_output(model, variables, x, train=False)
        _, train_stats = _stats_and_output(model, variables, x, train=True)
        single = model.apply(variables, x[:1], train=False)
        return eval_out, eval_stats, train_stats, single

    out_batch, eval_stats, train_stats, out_single = run(variables, x)
    chex.assert_trees_all_equal(eval_stats, variables["batch_stats"])
    diffs = jax.tree.map(
        lambda a, b: jnp.max(jnp.abs(a - b)), train_stats, variables["batch_stats"]
    )
    assert all(d > 0 for d in jax.tree.leaves(diffs))
    # Eval mode reads the running averages: the output does not depend on the batch.
    np.testing.assert_allclose(out_batch[:1], out_single, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "name, options",
    # The classifiers' dropout layers at a smaller width: the same layers, 30x fewer weights.
    [("alexnet", {"hidden_width": 256}), ("vgg11", {"hidden_width": 256}),
     ("simple_cnn", {"dropout_rate": 0.5}), ("netresdeep", {"dropout_rate": 0.3, "n_blocks": 2})],
)  # fmt: skip
def test_dropout_only_in_train_mode(name, options):
    spec = models.get_spec(name)
    model = models.create(name, num_classes=10, **options)
    size = small_size(spec)
    x = normal((2, size, size, 3))
    variables = he_variables(model, x.shape)
    eval_a, _ = _stats_and_output(model, variables, x, train=False, rng=1)
    eval_b, _ = _stats_and_output(model, variables, x, train=False, rng=2)
    chex.assert_trees_all_equal(eval_a, eval_b)
    train_a, _ = _stats_and_output(model, variables, x, train=True, rng=1)
    train_b, _ = _stats_and_output(model, variables, x, train=True, rng=2)
    train_a2, _ = _stats_and_output(model, variables, x, train=True, rng=1)
    chex.assert_shape((eval_a, train_a, train_b), (2, 10))
    chex.assert_tree_all_finite((eval_a, train_a, train_b))  # NaN would pass the rest
    assert not np.allclose(train_a, train_b)
    chex.assert_trees_all_close(train_a, train_a2)


@pytest.mark.slow  # the quick lane's: test_batchnorm.py (the layer), test_steps.py (a step)
@pytest.mark.parametrize("name", ["netresdeep", "resnet20"])
def test_pmap_over_four_devices_equals_one_device(name):
    """BatchNorm over the global batch: 4 devices x 2 images == 1 device x 8 images."""
    assert jax.local_device_count() == 4, "conftest sets four CPU devices"
    model = models.create(name, num_classes=10, axis_name="batch")
    # jax.random's draw, for which the tolerances below were set (with another draw a logit
    # near zero can differ by 2e-5 > atol)
    x = 2.0 + jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    # The network's own initialisation (the tolerances below are set for its scale), compiled
    # as the trainer compiles its initialiser: faster, the same bits (test_state.py).
    init = functools.partial(models.create(name, num_classes=10).init, train=False)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    variables = compile_once(lambda: init(rngs, jnp.zeros(x.shape)))()

    def step(v, x):
        return model.apply(v, x, train=True, mutable=["batch_stats"])

    # One device: the same function, its "batch" axis of size 1 provided by vmap.
    single_out, single_upd = jax.jit(
        jax.vmap(step, in_axes=(None, None), out_axes=(None, None), axis_name="batch", axis_size=1)
    )(variables, x)
    replicated = jax.tree.map(lambda a: jnp.broadcast_to(a, (4, *a.shape)), variables)
    par_out, par_upd = jax.pmap(step, axis_name="batch")(replicated, x.reshape(4, 2, 32, 32, 3))

    np.testing.assert_allclose(par_out.reshape(8, -1), single_out, rtol=1e-4, atol=1e-5)
    # Statistics of O(1) activations, summed in another order: equal to 1e-5.
    for d in range(4):
        chex.assert_trees_all_close(
            jax.tree.map(lambda a, d=d: a[d], par_upd), single_upd, rtol=1e-5, atol=1e-5
        )
    # Without the axis name each device would normalise with its own 2 images: different.
    local = models.create(name, num_classes=10)
    local_out, _ = jax.pmap(lambda v, x: local.apply(v, x, train=True, mutable=["batch_stats"]))(
        replicated, x.reshape(4, 2, 32, 32, 3)
    )
    assert not np.allclose(local_out.reshape(8, -1), single_out, rtol=1e-3, atol=1e-3)
