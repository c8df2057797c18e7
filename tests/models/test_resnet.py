"""ResNets: torchvision's exact sizes and costs, He et al.'s CIFAR nets, block definitions,
and the scanned layout computing the same function."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_testing import KEY, normal, published_bound

from flaxcnn import models
from flaxcnn.models import layers, resnet, summary
from flaxcnn.training.state import compile_once

IMAGENET = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
CIFAR_DEPTHS = (20, 32, 44, 56, 110)


def output_shapes(model, size: int) -> dict[str, tuple[int, ...]]:
    """Per-image output shape of every top-level layer (abstract, nothing compiled)."""
    rows = summary.layer_table(model, (1, size, size, 3), depth=1)
    return {row.path: row.output_shape[1:] for row in rows}


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_parameter_counts_and_macs_match_torchvision(name, reference):
    # One abstract pass: the rows of the summary add up to the whole network.
    rows = summary.layer_table(models.create(name), (1, 224, 224, 3), depth=1)
    assert sum(row.params for row in rows) == reference["params"][name]
    published = reference["gmacs"][name]
    macs = sum(row.macs for row in rows)
    assert abs(macs - published * 1e9) <= published_bound(published), f"{name}: {macs:,}"


def test_convolutions_are_bias_free_with_batchnorm_after_each():
    shapes = summary.init_shapes(models.create("resnet50"), (1, 32, 32, 3))
    params, stats = shapes["params"], shapes["batch_stats"]
    convs = {
        path for path, leaf in _flat(params).items() if path.endswith("/kernel") and leaf.ndim == 4
    }
    assert len(convs) == 53  # 1 stem + 16 blocks x 3 + 4 projections
    assert not any(path.replace("/kernel", "/bias") in _flat(params) for path in convs)
    # Each conv feeds the BatchNorm torchvision pairs it with: conv{k} -> bn{k},
    # downsample_0 -> downsample_1, with matching widths.
    for path in convs:
        parent, _, conv = path.removesuffix("/kernel").rpartition("/")
        bn = conv.replace("conv", "bn") if conv.startswith("conv") else "downsample_1"
        width = _flat(params)[path].shape[-1]
        assert _flat(stats)[f"{parent}/{bn}/mean".lstrip("/")].shape == (width,)


def _flat(tree) -> dict:
    return {
        "/".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


@pytest.mark.parametrize(
    "depth", [pytest.param(d, marks=[pytest.mark.slow] if d > 56 else []) for d in CIFAR_DEPTHS]
)
def test_cifar_resnets_have_the_papers_parameter_counts(depth, reference):
    paper = reference["other"]["he2016_cifar10_params_millions"][f"resnet{depth}"]
    decimals = len(str(paper).split(".")[1])
    count_a = summary.count_params(models.create(f"resnet{depth}"), (1, 32, 32, 3))
    count_b = summary.count_params(models.create(f"resnet{depth}", shortcut="B"), (1, 32, 32, 3))
    plain_params = summary.init_shapes(models.create(f"plain{depth}"), (1, 32, 32, 3))["params"]
    plain = summary.tree_size(plain_params)
    assert round(count_a / 1e6, decimals) == paper
    # Option A's shortcuts are parameter-free, so the plain net has exactly as many; option B
    # adds two 1x1 projections with BatchNorm, 16 -> 32 and 32 -> 64.
    assert plain == count_a
    assert count_b - count_a == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    # 6n+2 weighted layers: the stem, 2 convs per block, the fc.
    n = (depth - 2) // 6
    weighted = [leaf for leaf in jax.tree.leaves(plain_params) if leaf.ndim in (2, 4)]
    assert len(weighted) == depth == 6 * n + 2


def test_cifar_feature_maps_are_32_16_8_with_16_32_64_channels():
    shapes = output_shapes(models.create("resnet20"), 32)
    assert shapes["conv1"] == (32, 32, 16)
    assert shapes["layer1_2"] == (32, 32, 16)
    assert shapes["layer2_2"] == (16, 16, 32)
    assert shapes["layer3_2"] == (8, 8, 64)
    assert shapes["fc"] == (10,)


@pytest.mark.parametrize(
    "name, small_stem, size, expected",
    [
        ("resnet18", False, 64, {"conv1": (32, 32, 64), "layer1_1": (16, 16, 64),
                                 "layer4_1": (2, 2, 512), "fc": (10,)}),
        ("resnet18", True, 32, {"conv1": (32, 32, 64), "layer1_1": (32, 32, 64),
                                "layer4_1": (4, 4, 512), "fc": (10,)}),
        ("resnet50", False, 64, {"layer1_2": (16, 16, 256), "layer4_2": (2, 2, 2048)}),
        ("resnet50", True, 32, {"layer1_2": (32, 32, 256), "layer4_2": (4, 4, 2048)}),
        ("resnet18", False, 33, {"layer1_1": (9, 9, 64), "layer4_1": (2, 2, 512)}),
    ],
)  # fmt: skip
def test_imagenet_shapes_with_and_without_small_stem(name, small_stem, size, expected):
    shapes = output_shapes(models.create(name, num_classes=10, small_stem=small_stem), size)
    for layer, shape in expected.items():
        assert shapes[layer] == shape, layer


def test_small_input_options_are_the_small_stem():
    assert all(models.get_spec(n).small_input_options == {"small_stem": True} for n in IMAGENET)
    spec = models.get_spec("resnet56")
    assert (spec.input_size, spec.num_classes, spec.family) == (32, 10, "resnet_cifar")
    assert models.options("resnet56")["shortcut"] == "A"
    assert models.options("resnet50")["shortcut"] == "B"
    with pytest.raises(ValueError, match="no option 'zero_init_residual'"):
        models.create("plain20", zero_init_residual=True)  # a plain net has no residual
    with pytest.raises(ValueError, match="unknown shortcut 'C'"):
        summary.init_shapes(models.create("resnet20", shortcut="C"), (1, 32, 32, 3))


def _bn_eval(y, stats, params):
    scale = params["scale"] / jnp.sqrt(stats["var"] + layers.TORCH_BN_EPSILON)
    return (y - stats["mean"]) * scale + params["bias"]


@pytest.mark.parametrize(
    "block_cls, in_ch, features, strides, shortcut",
    [
        (resnet.BasicBlock, 8, 8, 1, "B"),   # identity
        (resnet.BasicBlock, 8, 16, 2, "B"),  # projection
        (resnet.BasicBlock, 8, 16, 2, "A"),  # strided, zero-padded identity
        (resnet.BasicBlock, 8, 8, 1, "none"),
        (resnet.Bottleneck, 16, 4, 1, "B"),  # 16 -> 4 -> 16: identity
        (resnet.Bottleneck, 8, 4, 2, "B"),   # 8 -> 16 at stride 2: projection
        (resnet.Bottleneck, 8, 4, 1, "A"),   # 8 -> 16: zero-padded identity
    ],
)  # fmt: skip
def test_block_with_zeroed_residual_branch_is_relu_of_its_shortcut(
    block_cls, in_ch, features, strides, shortcut
):
    block = block_cls(
        features,
        conv=functools.partial(nn.Conv, use_bias=False),
        norm=functools.partial(layers.batch_norm, False),
        strides=strides,
        shortcut=shortcut,
        zero_init_last=True,
    )
    x = normal((2, 7, 7, in_ch))
    variables = jax.jit(block.init)(KEY, x)
    last, out_ch = ("bn3", 4 * features) if block_cls is resnet.Bottleneck else ("bn2", features)
    chex.assert_trees_all_equal(variables["params"][last]["scale"], jnp.zeros(out_ch))
    # Non-trivial running statistics, so that only the zero scale can zero the branch.
    variables = {
        "params": variables["params"],
        "batch_stats": jax.tree.map(lambda a: a + 0.5, variables["batch_stats"]),
    }
    out = jax.jit(block.apply)(variables, x)

    projects = "downsample_0" in variables["params"]
    assert projects == (shortcut == "B" and (strides != 1 or in_ch != out_ch))
    if shortcut == "none":
        expected = jnp.zeros((2, 7, 7, out_ch))
    elif projects:
        kernel = variables["params"]["downsample_0"]["kernel"]
        assert kernel.shape == (1, 1, in_ch, out_ch)
        y = jax.lax.conv_general_dilated(
            x, kernel, (strides, strides), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        bn = "downsample_1"
        expected = nn.relu(_bn_eval(y, variables["batch_stats"][bn], variables["params"][bn]))
    else:
        x = x[:, ::strides, ::strides, :]
        expected = nn.relu(jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, out_ch - in_ch))))
    chex.assert_shape(out, expected.shape)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_zero_init_residual_zeroes_every_blocks_last_scale_only():
    model = resnet.ResNet(
        stage_sizes=(1, 3),
        block=resnet.BasicBlock,
        num_classes=2,
        num_filters=4,
        small_stem=True,
        zero_init_residual=True,
        scan_blocks=True,
    )
    params = _init(model, jnp.zeros((1, 4, 4, 3)))["params"]
    for path, leaf in _flat(params).items():
        if path.endswith("/scale"):
            assert bool(jnp.all(leaf == 0)) == ("/bn2/" in path), path
    assert "layer2_rest" in params  # also inside the scanned blocks


def _init(model, x):
    """The model's initial variables, compiled as the trainer compiles its initialiser:
    faster, the same bits (tests/training/test_state.py)."""
    return compile_once(lambda: model.init(KEY, x, train=False))()


@pytest.mark.slow  # four compiles of a whole network; the layouts' structure: tests below
@pytest.mark.parametrize(
    "builder",
    [
        resnet.cifar_resnet(20),
        # A small bottleneck net: projection in layer1_0 and at the stride, then identities.
        functools.partial(
            resnet.ResNet, stage_sizes=(2, 3), block=resnet.Bottleneck, num_filters=8,
            small_stem=True, num_classes=5,
        ),
    ],
)  # fmt: skip
def test_scanned_blocks_compute_the_same_function(builder):
    plain, scanned = builder(), builder(scan_blocks=True)
    x = normal((4, 8, 8, 3), seed=1, offset=1.0)
    variables = _init(plain, x)
    # Non-trivial statistics so that a block mixed up with another would show.
    variables = {
        "params": variables["params"],
        "batch_stats": jax.tree.map(
            lambda a: a + np.linspace(0.1, 0.9, a.size, dtype=np.float32).reshape(a.shape),
            variables["batch_stats"],
        ),
    }
    stacked = resnet.to_scan_layout(variables)
    # The layout mapping is exactly the scanned model's own variable structure.
    chex.assert_trees_all_equal_shapes_and_dtypes(
        stacked, jax.eval_shape(lambda x: scanned.init(jax.random.key(0), x, train=False), x)
    )
    chex.assert_trees_all_equal(resnet.from_scan_layout(stacked), variables)

    @functools.partial(jax.jit, static_argnums=0)
    def run(model, variables):
        evaluated = model.apply(variables, x, train=False)
        trained, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return evaluated, trained, updates

    eval_p, train_p, upd_p = run(plain, variables)
    eval_s, train_s, upd_s = run(scanned, stacked)
    np.testing.assert_allclose(eval_s, eval_p, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(train_s, train_p, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(resnet.from_scan_layout(upd_s), upd_p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet152", "resnet110"])
def test_scanned_deep_networks_have_the_same_parameters(name):
    spec = models.get_spec(name)
    shape = (1, spec.input_size, spec.input_size, 3)
    plain = summary.init_shapes(models.create(name), shape)
    scanned = summary.init_shapes(models.create(name, scan_blocks=True), shape)
    assert summary.tree_size(scanned["params"]) == summary.tree_size(plain["params"])
    chex.assert_trees_all_equal_shapes(jax.eval_shape(resnet.to_scan_layout, plain), scanned)
