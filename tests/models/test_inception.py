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
from jax.extend import core as jax_core
from model_testing import KEY, normal, published_bound

from flaxcnn import losses, models
from flaxcnn.models import inception, layers, summary
from flaxcnn.models.inception import INCEPTION_CONFIGS, Inception
from flaxcnn.training import steps


def random_variables(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> dict:
    """He-scaled numpy weights in the variables' shapes (BatchNorm at its initial values):
    realistic activations without compiling the network's initialiser."""
    rng = np.random.default_rng(seed)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return np.ones(leaf.shape, np.float32)
        if name in ("bias", "mean"):
            return np.zeros(leaf.shape, np.float32)
        fan_in = math.prod(leaf.shape[:-1])
        return rng.standard_normal(leaf.shape, np.float32) * np.float32(math.sqrt(2 / fan_in))

    return jax.tree_util.tree_map_with_path(fill, shapes)


def test_parameter_counts_and_macs_match_torchvision(reference):
    shape = (1, 224, 224, 3)
    published = reference["gmacs"]["googlenet"]
    # Without the heads, one abstract pass: the summary's rows add up to the whole network.
    rows = summary.layer_table(models.create("googlenet"), shape, depth=1)
    assert sum(row.params for row in rows) == reference["params"]["googlenet"]
    macs = sum(row.macs for row in rows)
    assert abs(macs - published * 1e9) <= published_bound(published), f"{macs:,} MACs"
    # With them: more parameters, the same inference cost (the heads only run in training).
    with_aux = models.create("googlenet", aux_logits=True)
    assert summary.count_params(with_aux, shape) == reference["params"]["googlenet_aux_logits"]
    assert summary.total_macs(with_aux, shape) == macs


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


class TestInceptionConcatenation(chex.TestCase):
    """The block traced under jit and run op by op (the whole GoogLeNet is compiled only:
    tests/models/test_models.py)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_inception_concatenates_the_branches_in_order(self):
        module = Inception(3, 2, 4, 2, 5, 6)
        x = normal((2, 5, 5, 8), seed=1)
        variables = random_variables(module, x.shape)  # no initialiser to compile

        def run(variables, x):
            return module.apply(
                variables,
                x,
                train=False,
                capture_intermediates=lambda m, _: isinstance(m, layers.ConvBN),
                mutable=["intermediates"],
            )

        out, state = self.variant(run)(variables, x)
        branches = state["intermediates"]
        names = ("branch1", "branch2_1", "branch3_1", "branch4_1")
        parts = [branches[b]["__call__"][0] for b in names]
        chex.assert_shape(out, (2, 5, 5, 3 + 4 + 5 + 6))
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
    a 16-channel 1x1 bottleneck first (the inception module's 5x5 branch), 12.12x fewer.

    Every figure is counted on the real modules, two ways: from each convolution's kernel
    and output shapes (`conv_macs`), and by the summary that `--summary` prints."""
    shape = (1, 28, 28, 256)
    direct_conv = layers.ConvBN(32, 5, padding=2)
    direct = conv_macs(direct_conv, shape)
    assert direct == {"conv": 160_563_200}
    assert summary.total_macs(direct_conv, shape) == 160_563_200

    module = Inception(64, 96, 128, 16, 32, 32, paper_5x5=True)
    macs = conv_macs(module, shape)
    rows = {r.path: r.macs for r in summary.layer_table(module, shape)}
    assert {path: rows[path] for path in macs} == macs  # the two counts agree, conv by conv
    assert sum(rows.values()) == sum(macs.values())  # and nothing else is counted
    reduce_, conv5x5 = macs["branch3_0/conv"], macs["branch3_1/conv"]
    assert (reduce_, conv5x5) == (3_211_264, 10_035_200)
    assert reduce_ + conv5x5 == 13_246_464
    assert round(direct["conv"] / (reduce_ + conv5x5), 2) == 12.12


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


def _reads(program: jax_core.ClosedJaxpr, inputs: int) -> list[bool]:
    """For each of the first `inputs` inputs of `program`: does any operation read it?"""
    variables = program.jaxpr.invars[:inputs]
    read = {
        v for eqn in program.jaxpr.eqns for v in eqn.invars if not isinstance(v, jax_core.Literal)
    }
    read |= {v for v in program.jaxpr.outvars if not isinstance(v, jax_core.Literal)}
    return [v in read for v in variables]


@pytest.mark.slow
def test_googlenet_trains_its_auxiliary_heads():
    """In training the auxiliary heads receive gradient from the training loss (the
    trainer's: the logits' cross-entropy plus 0.3 times each head's), update their
    BatchNorm statistics and drop out; in inference they are not run at all."""
    model = models.create("googlenet", num_classes=10, aux_logits=True)
    x = normal((4, 32, 32, 3), seed=1, offset=1.0)
    labels = jnp.arange(4)
    variables = random_variables(model, x.shape)
    params, stats, heads = variables["params"], variables["batch_stats"], ("aux1", "aux2")
    assert set(heads) <= set(params) and set(heads) <= set(stats)

    @jax.jit
    def train(head_params, rng):
        def loss(head_params):  # differentiated for the heads' parameters only: cheaper
            outputs, updates = model.apply(
                {"params": {**params, **head_params}, "batch_stats": stats},
                x,
                train=True,
                rngs={"dropout": rng},
                mutable=["batch_stats"],
            )
            logits, aux = steps.split_outputs(outputs)
            total = losses.cross_entropy(logits, labels)
            for aux_logits in aux:
                total += steps.AUX_LOSS_WEIGHT * losses.cross_entropy(aux_logits, labels)
            return total, (logits, aux, updates["batch_stats"])

        return jax.grad(loss, has_aux=True)(head_params)

    head_params = {h: params[h] for h in heads}
    grads, (logits, (aux1, aux2), new_stats) = train(head_params, jax.random.key(2))
    chex.assert_tree_all_finite((grads, logits, aux1, aux2))
    assert len(jax.tree.leaves(grads)) == 2 * 7  # conv kernel, bn scale and bias, fc1, fc2
    for path, grad in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.any(np.asarray(grad) != 0), jax.tree_util.keystr(path)
    for head in heads:
        new, old = new_stats[head]["conv"]["bn"]["mean"], stats[head]["conv"]["bn"]["mean"]
        assert not np.allclose(new, old)
    _, (logits_b, (aux1_b, _), _) = train(head_params, jax.random.key(3))
    assert not np.allclose(aux1, aux1_b)  # dropout 0.7 in the head
    assert not np.allclose(logits, logits_b)  # dropout 0.2 before the fc

    # Inference does not run the heads: no operation of its program reads their variables
    # (traced, not compiled); the training program, checked the same way, reads them all.
    head_vars = {"params": head_params, "batch_stats": {h: stats[h] for h in heads}}
    rest = {c: {k: v for k, v in variables[c].items() if k not in heads} for c in variables}

    def apply(head_vars, rest, train):
        merged = {c: {**rest[c], **head_vars[c]} for c in rest}
        return model.apply(merged, x, train=train, rngs={"dropout": jax.random.key(0)},
                           mutable=["batch_stats"] if train else False)  # fmt: skip

    n = len(jax.tree.leaves(head_vars))
    inference = jax.make_jaxpr(functools.partial(apply, train=False))(head_vars, rest)
    assert not any(_reads(inference, n))
    training = jax.make_jaxpr(functools.partial(apply, train=True))(head_vars, rest)
    assert all(_reads(training, n))


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
    x = normal((2, 32, 32, 3), seed=1)

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
