"""GoogLeNet: torchvision's size and cost, the inception module, the auxiliary heads, and the
course's 1x1-bottleneck arithmetic computed from the real modules."""

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcnn import models
from flaxcnn.models import inception, layers, summary
from flaxcnn.models.inception import INCEPTION_CONFIGS, Inception

# Initialisers compile several times faster from a random-bit-generator key than threefry.
KEY = jax.random.key(0, impl="rbg")


def test_parameter_counts_and_macs_match_torchvision(reference):
    shape = (1, 224, 224, 3)
    assert (
        summary.count_params(models.create("googlenet"), shape) == reference["params"]["googlenet"]
    )
    with_aux = models.create("googlenet", aux_logits=True)
    assert summary.count_params(with_aux, shape) == reference["params"]["googlenet_aux_logits"]
    expected = reference["gmacs"]["googlenet"] * 1e9
    for model in (models.create("googlenet"), with_aux):  # the heads only run in training
        macs = summary.total_macs(model, shape)
        assert abs(macs - expected) / expected < 0.03, f"{macs / 1e9:.3f} GMACs"


def test_paper_5x5_branch_adds_exactly_the_extra_taps():
    shape = (1, 224, 224, 3)
    base = summary.count_params(models.create("googlenet"), shape)
    paper = summary.count_params(models.create("googlenet", paper_5x5=True), shape)
    extra = sum(red * out * (5 * 5 - 3 * 3) for *_, red, out, _ in INCEPTION_CONFIGS.values())
    assert paper - base == extra


@pytest.mark.parametrize("paper_5x5", [False, True])
@pytest.mark.parametrize("name", list(INCEPTION_CONFIGS))
def test_inception_output_channels_are_the_sum_of_its_branches(name, paper_5x5):
    ch1x1, _, ch3x3, _, ch5x5, pool_proj = INCEPTION_CONFIGS[name]
    module = Inception(*INCEPTION_CONFIGS[name], paper_5x5=paper_5x5)
    rows = {r.path: r.output_shape for r in summary.layer_table(module, (2, 7, 7, 24), depth=1)}
    # Every branch keeps the 7x7 size, so that they line up on the channel axis.
    assert rows["branch1"] == (2, 7, 7, ch1x1)
    assert rows["branch2_1"] == (2, 7, 7, ch3x3)
    assert rows["branch3_1"] == (2, 7, 7, ch5x5)
    assert rows["branch4_1"] == (2, 7, 7, pool_proj)
    variables = summary.init_shapes(module, (2, 7, 7, 24))
    out = jax.eval_shape(
        lambda v, x: module.apply(v, x, train=False), variables, jnp.zeros((2, 7, 7, 24))
    )
    assert out.shape == (2, 7, 7, ch1x1 + ch3x3 + ch5x5 + pool_proj)
    k = 5 if paper_5x5 else 3
    assert variables["params"]["branch3_1"]["conv"]["kernel"].shape[:2] == (k, k)


def test_inception_concatenates_the_branches_in_order():
    module = Inception(3, 2, 4, 2, 5, 6)
    x = jax.random.normal(jax.random.key(1), (2, 5, 5, 8))
    variables = jax.jit(functools.partial(module.init, train=False))(KEY, x)

    @jax.jit
    def run(variables, x):
        return module.apply(
            variables,
            x,
            train=False,
            capture_intermediates=lambda m, _: isinstance(m, layers.ConvBN),
            mutable=["intermediates"],
        )

    out, state = run(variables, x)
    branches = state["intermediates"]
    parts = [branches[b]["__call__"][0] for b in ("branch1", "branch2_1", "branch3_1", "branch4_1")]
    chex.assert_trees_all_equal(out, jnp.concatenate(parts, axis=-1))


def conv_macs(module: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Multiply-adds per image of each convolution in `module`, from its kernel's shape
    (kh, kw, in, out) and its output's shape (N, H, W, out): H*W*out * kh*kw*in."""
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    variables = jax.eval_shape(lambda x: module.init(KEY, x, train=False), x)
    _, state = jax.eval_shape(
        lambda v, x: module.apply(
            v,
            x,
            train=False,
            capture_intermediates=lambda m, _: isinstance(m, nn.Conv),
            mutable=["intermediates"],
        ),
        variables,
        x,
    )
    macs = {}
    for path, out in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
        keys = [k.key for k in path if hasattr(k, "key")]
        conv_path = keys[: keys.index("__call__")]
        kernel = functools.reduce(lambda tree, k: tree[k], conv_path, variables["params"])
        kh, kw, c_in, c_out = kernel["kernel"].shape
        _, h, w, c = out.shape
        assert c == c_out
        macs["/".join(conv_path)] = h * w * c_out * kh * kw * c_in
    return macs


def test_course_bottleneck_example():
    """28x28x256 to 32 filters of 5x5: 160,563,200 multiply-adds directly, 13,246,464 through
    a 16-channel 1x1 bottleneck first (the inception module's 5x5 branch)."""
    shape = (1, 28, 28, 256)
    direct = conv_macs(layers.ConvBN(32, 5, padding=2), shape)
    assert direct == {"conv": 28 * 28 * 32 * 5 * 5 * 256} == {"conv": 160_563_200}

    module = Inception(64, 96, 128, 16, 32, 32, paper_5x5=True)
    macs = conv_macs(module, shape)
    reduce_, conv5x5 = macs["branch3_0/conv"], macs["branch3_1/conv"]
    assert reduce_ == 28 * 28 * 16 * 256 == 3_211_264
    assert conv5x5 == 28 * 28 * 32 * 5 * 5 * 16 == 10_035_200
    assert reduce_ + conv5x5 == 13_246_464
    # The lead's summary table agrees with the count from shapes.
    rows = {r.path: r.macs for r in summary.layer_table(module, shape)}
    assert rows["branch3_0/conv"] + rows["branch3_1/conv"] == 13_246_464
    assert math.isclose(160_563_200 / 13_246_464, 12.12, rel_tol=1e-3)


@pytest.mark.parametrize("size", [32, inception.MIN_SIZE])
def test_googlenet_shapes_with_and_without_auxiliary_heads(size):
    x = jnp.zeros((2, size, size, 3))
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    with_aux = models.create("googlenet", num_classes=10, aux_logits=True)
    # Variables from an eval-mode init already hold the heads, so they serve training.
    variables = jax.eval_shape(lambda x: with_aux.init(rngs, x, train=False), x)
    assert {"aux1", "aux2"} <= set(variables["params"])
    heads = variables["params"]
    assert heads["aux1"]["conv"]["conv"]["kernel"].shape == (1, 1, 512, 128)  # after 4a
    assert heads["aux2"]["conv"]["conv"]["kernel"].shape == (1, 1, 528, 128)  # after 4d
    assert heads["aux1"]["fc1"]["kernel"].shape == (128 * 4 * 4, 1024)

    def apply(model, train):
        return jax.eval_shape(
            lambda v, x: model.apply(v, x, train=train, rngs=rngs, mutable=["batch_stats"])[0],
            variables,
            x,
        )

    logits, (aux1, aux2) = apply(with_aux, train=True)
    assert logits.shape == aux1.shape == aux2.shape == (2, 10)
    assert apply(with_aux, train=False).shape == (2, 10)
    without = models.create("googlenet", num_classes=10)
    variables = jax.eval_shape(lambda x: without.init(rngs, x, train=False), x)
    assert not {"aux1", "aux2"} & set(variables["params"])
    assert apply(without, train=True).shape == (2, 10)


@pytest.mark.slow
def test_googlenet_trains_its_auxiliary_heads():
    model = models.create("googlenet", num_classes=10, aux_logits=True)
    x = 1.0 + jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    variables = jax.jit(functools.partial(model.init, train=False))(KEY, x)

    @jax.jit
    def train_forward(variables, rng):
        return model.apply(variables, x, train=True, rngs={"dropout": rng}, mutable=["batch_stats"])

    (logits, (aux1, aux2)), updates = train_forward(variables, jax.random.key(2))
    chex.assert_tree_all_finite((logits, aux1, aux2))
    for head in ("aux1", "aux2"):
        new, old = updates["batch_stats"][head], variables["batch_stats"][head]
        assert not np.allclose(new["conv"]["bn"]["mean"], old["conv"]["bn"]["mean"])
    (logits_b, (aux1_b, _)), _ = train_forward(variables, jax.random.key(3))
    assert not np.allclose(aux1, aux1_b)  # dropout 0.7 in the head
    assert not np.allclose(logits, logits_b)  # dropout 0.2 before the fc


def test_transform_input_is_torchvisions():
    """`transform_input=True` remaps the input exactly as torchvision's GoogLeNet does for its
    pretrained weights, and adds no variables."""
    reason = "comparing with torchvision needs the torch extra: pip install 'flaxcnn[torch]'"
    torch = pytest.importorskip("torch", reason=reason)
    torchvision = pytest.importorskip("torchvision", reason=reason)
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 7)).astype(np.float32)  # NCHW
    reference = torchvision.models.GoogLeNet(transform_input=True, init_weights=False)
    expected = reference._transform_input(torch.from_numpy(x)).numpy()
    ours = np.asarray(inception.imagenet_to_unit_range(jnp.asarray(x.transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(ours.transpose(0, 3, 1, 2), expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(ours.transpose(0, 3, 1, 2), x)


def test_transform_input_runs_before_the_first_convolution():
    """The first convolution sees the remapped image (the network is stopped right there:
    nothing is compiled), and the option adds no variables."""
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))

    class Seen(Exception):
        pass

    def first_conv_input(model):
        def stop(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.Conv):
                raise Seen(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(stop), pytest.raises(Seen) as seen:
            model.apply({"params": {}}, x, train=False)
        return seen.value.args[0]

    plain = models.create("googlenet", num_classes=10)
    remapped = models.create("googlenet", num_classes=10, transform_input=True)
    chex.assert_trees_all_equal(first_conv_input(plain), x)
    chex.assert_trees_all_equal(first_conv_input(remapped), inception.imagenet_to_unit_range(x))

    def init(model):
        return jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)

    chex.assert_trees_all_equal_shapes_and_dtypes(init(plain), init(remapped))
