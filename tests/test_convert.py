"""`flaxcnn.convert`: torchvision state_dicts as flaxcnn variables and run directories.

The first half needs no torch: key checking on numpy dicts, safetensors files, bad files
that are refused before torch is needed, the run directory. The second half compares
logits with torchvision's own models for every architecture and drives the command line;
it is skipped, with the reason, where torch is not installed.
"""

import functools
import gc
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

from flaxcnn import cli, convert, imagenet, models
from flaxcnn.convert_io import sha256
from flaxcnn.training import warm_start
from flaxcnn.training.rundir import RunDir

TORCH_REASON = "converting .pth files needs the torch extra: pip install 'flaxcnn[torch]'"
HEAVY = {  # see logit_cases
    "resnet101", "resnet152", "vgg13", "vgg16", "vgg19", "vgg13_bn", "vgg16_bn", "vgg19_bn",
}  # fmt: skip


def needs_torch():
    """(torch, torchvision), or skip the test saying how to get them."""
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    torchvision = pytest.importorskip("torchvision", reason=TORCH_REASON)
    return torch, torchvision


NOISE_PERIOD = 1_000_003  # a prime, so that the repeats line up with no tensor's shape


@functools.cache
def normal_noise() -> np.ndarray:
    return np.random.default_rng(12345).standard_normal(NOISE_PERIOD, dtype=np.float32)


def numpy_state_dict(arch: str, aux_logits: bool = False, seed: int = 0) -> dict:
    """A state_dict of `arch` as numpy arrays with torchvision's names and shapes, random
    values (variances positive), and torch's num_batches_tracked beside each BatchNorm.

    The values are a block of normal noise repeated from a random offset per tensor: VGG's
    130M values cost a copy, not 130M draws."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in convert.state_dict_shapes(arch, aux_logits=aux_logits).items():
        values = np.resize(np.roll(normal_noise(), rng.integers(NOISE_PERIOD)), shape)
        out[key] = np.abs(values) + 0.5 if key.endswith("running_var") else values
        if key.endswith("running_var"):
            out[key.replace("running_var", "num_batches_tracked")] = np.array(7, np.int64)
    return out


@functools.cache
def init_shapes(arch: str, **options) -> dict:
    model = models.create(arch, **options)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def shapes(tree) -> dict:
    return jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), tree)


# -- the names and shapes, without torch ----------------------------------------------------


@pytest.mark.parametrize(
    "arch, aux", [("resnet18", False), ("alexnet", False), ("googlenet", False),
                  ("googlenet", True), ("vgg11_bn", False)],
)  # fmt: skip
def test_converts_to_exactly_the_models_variables(arch, aux):
    state_dict = numpy_state_dict(arch, aux)
    options = convert.model_options(arch, state_dict)
    assert options == ({"aux_logits": aux, "transform_input": True} if arch == "googlenet" else {})
    variables = convert.from_torchvision(arch, state_dict)
    expected = init_shapes(arch, **options)
    assert shapes(variables) == shapes(
        {"params": expected["params"], "batch_stats": expected.get("batch_stats", {})}
    )
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(variables))


def test_every_arch_is_a_flaxcnn_model_with_its_torchvision_key_count():
    assert set(convert.ARCHS) <= set(models.names())
    # torchvision's state_dict sizes, num_batches_tracked left out.
    counts = {"resnet18": 102, "resnet50": 267, "resnet152": 777, "vgg11": 22, "vgg19_bn": 102,
              "alexnet": 16, "googlenet": 287}  # fmt: skip
    for arch, count in counts.items():
        assert len(convert.state_dict_shapes(arch)) == count, arch
    assert len(convert.state_dict_shapes("googlenet", aux_logits=True)) == 305


def test_names_and_transposes():
    sd = numpy_state_dict("resnet18")
    variables = convert.from_torchvision("resnet18", sd)
    params, stats = variables["params"], variables["batch_stats"]
    w = sd["layer2.0.downsample.0.weight"]  # (out, in, kh, kw)
    kernel = params["layer2_0"]["downsample_0"]["kernel"]  # (kh, kw, in, out)
    np.testing.assert_array_equal(kernel, w.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        params["conv1"]["kernel"][3, 5, 1, 60], sd["conv1.weight"][60, 1, 3, 5]
    )
    np.testing.assert_array_equal(params["fc"]["kernel"], sd["fc.weight"].T)
    np.testing.assert_array_equal(params["fc"]["bias"], sd["fc.bias"])
    bn = "layer2.0.downsample.1"
    np.testing.assert_array_equal(params["layer2_0"]["downsample_1"]["scale"], sd[f"{bn}.weight"])
    np.testing.assert_array_equal(stats["layer2_0"]["downsample_1"]["var"], sd[f"{bn}.running_var"])
    np.testing.assert_array_equal(stats["bn1"]["mean"], sd["bn1.running_mean"])

    vgg = convert.state_dict_shapes("vgg11_bn")
    assert vgg["features.4.weight"] == (128, 64, 3, 3)  # conv2: after conv, bn, relu, pool
    assert vgg["features.5.running_var"] == (128,)
    assert vgg["classifier.3.weight"] == (4096, 4096)
    alexnet = list(convert.state_dict_shapes("alexnet"))
    assert alexnet[::2] == [f"features.{i}.weight" for i in (0, 3, 6, 8, 10)] + [
        f"classifier.{i}.weight" for i in (1, 4, 6)
    ]
    googlenet = convert.state_dict_shapes("googlenet", aux_logits=True)
    assert googlenet["inception4a.branch2.1.conv.weight"] == (208, 96, 3, 3)
    assert googlenet["aux1.fc1.weight"] == (1024, 2048)
    assert googlenet["conv1.bn.running_mean"] == (64,)


def test_float16_and_float64_become_float32():
    sd = numpy_state_dict("alexnet")
    sd["classifier.6.bias"] = sd["classifier.6.bias"].astype(np.float16)
    sd["features.0.bias"] = sd["features.0.bias"].astype(np.float64)
    variables = convert.from_torchvision("alexnet", sd)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {np.dtype(np.float32)}
    assert variables["batch_stats"] == {}


def _drop(key):
    return lambda sd: sd.pop(key)


def _set(key, value):
    return lambda sd: sd.__setitem__(key, value)


@pytest.mark.parametrize(
    "change, message",
    [
        (_drop("layer3.1.bn2.weight"), "missing key 'layer3.1.bn2.weight' for resnet18"),
        (_set("layer9.weight", np.zeros(3, np.float32)), "unexpected key 'layer9.weight' for"),
        (_set("fc.num_batches_tracked", np.array(0)), "unexpected key 'fc.num_batches_tracked'"),
        (_set("fc.weight", np.zeros((10, 512), np.float32)),
         "'fc.weight' has shape (10, 512), resnet18 expects (1000, 512)"),
        (_set("conv1.weight", "weights"), "'conv1.weight' is a str, not an array"),
        (_set("fc.bias", None), "'fc.bias' is a NoneType, not an array"),
        (_set("fc.bias", np.zeros(1000, np.int64)), "'fc.bias' holds int64 values"),
        (_set("fc.bias", np.full(1000, np.nan, np.float32)), "'fc.bias' has 1000 non-finite"),
        (_set("bn1.running_var", -np.ones(64, np.float32)), "'bn1.running_var' has negative"),
    ],
)  # fmt: skip
def test_bad_state_dicts_name_the_first_offending_key(change, message):
    sd = numpy_state_dict("resnet18")
    change(sd)
    with pytest.raises(convert.ConversionError) as e:
        convert.from_torchvision("resnet18", sd)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_keys_of_another_architecture_are_named():
    expected = r"^missing key 'layer1\.2\.conv1\.weight' and \d+ more for resnet34 "
    with pytest.raises(
        convert.ConversionError, match=expected + r"\(the keys are those of resnet18\)$"
    ):
        convert.from_torchvision("resnet34", numpy_state_dict("resnet18"))
    with pytest.raises(convert.ConversionError, match=r"\(the keys are those of vgg11\)$"):
        convert.from_torchvision("vgg11_bn", numpy_state_dict("vgg11"))
    with pytest.raises(convert.ConversionError) as e:
        sd = numpy_state_dict("resnet18")
        sd.pop("fc.bias")
        convert.from_torchvision("resnet34", sd)  # no architecture has these keys
    assert "those of" not in str(e.value)
    # googlenet's auxiliary heads come with the keys; half of them is an error
    sd = numpy_state_dict("googlenet", aux_logits=True)
    assert convert.model_options("googlenet", sd)["aux_logits"] is True
    sd = {k: v for k, v in sd.items() if not k.startswith("aux2.")}
    with pytest.raises(convert.ConversionError, match=r"missing key 'aux2\.conv\.conv\.weight'"):
        convert.from_torchvision("googlenet", sd)


def test_unknown_architecture_and_non_mapping():
    with pytest.raises(convert.ConversionError, match="cannot convert architecture 'resnet20'"):
        convert.from_torchvision("resnet20", {})
    with pytest.raises(convert.ConversionError, match="cannot convert"):
        convert.model_options("lenet5", {})
    with pytest.raises(convert.ConversionError, match="got a list"):
        convert.from_torchvision("resnet18", [np.zeros(3)])
    with pytest.raises(convert.ConversionError, match="key 3 is not a name"):
        convert.from_torchvision("resnet18", {3: np.zeros(3)})


# -- reading files, without torch -----------------------------------------------------------


def write_bf16_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file of bfloat16 tensors (float32 values truncated), written by hand:
    numpy has no bfloat16 to give `safetensors.numpy.save_file`."""
    header, body, offset = {}, b"", 0
    for key, value in tensors.items():
        raw = (np.asarray(value, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[key] = {"dtype": "BF16", "shape": list(value.shape),
                       "data_offsets": [offset, offset + len(raw)]}  # fmt: skip
        body, offset = body + raw, offset + len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def test_reads_safetensors_including_bfloat16(tmp_path):
    sd = numpy_state_dict("alexnet")
    safetensors.numpy.save_file(sd, tmp_path / "a.safetensors")
    read = convert.read_state_dict(tmp_path / "a.safetensors")
    assert list(read) == sorted(sd) and all(np.array_equal(read[k], sd[k]) for k in sd)

    values = {"w": np.array([[1.0, -2.5], [3.0, 0.15625]], np.float32), "b": np.ones(3, np.float32)}
    write_bf16_safetensors(tmp_path / "b.safetensors", values)
    read = convert.read_state_dict(tmp_path / "b.safetensors")
    assert read["w"].dtype == np.float32
    np.testing.assert_array_equal(read["w"], values["w"])  # exact in bfloat16
    np.testing.assert_array_equal(read["b"], values["b"])


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.safetensors", None, "no such file"),
        ("folder.safetensors", "dir", "is a directory"),
        ("empty.safetensors", b"", "is empty"),
        ("text.safetensors", b"just some text, not tensors\n", "cannot read"),
        ("random.safetensors", os.urandom(3000), "cannot read"),
    ],
)
def test_bad_files_are_one_line_usage_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(cli.UsageError) as e:
        convert.read_state_dict(path)
    assert str(path) in str(e.value) and message in str(e.value)
    assert "\n" not in str(e.value)


def test_pth_without_torch_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"PK\x03\x04 something")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(cli.UsageError) as e:
        convert.read_state_dict(path)
    assert str(path) in str(e.value) and "pip install 'flaxcnn[torch]'" in str(e.value)
    assert ".safetensors" in str(e.value)


# -- the run directory, without torch ---------------------------------------------------------


def test_run_directory_restores_exactly_and_is_a_warm_start_source(tmp_path):
    sd = numpy_state_dict("resnet18")
    source = tmp_path / "r18.safetensors"
    safetensors.numpy.save_file(sd, source)
    variables = convert.from_torchvision("resnet18", convert.read_state_dict(source))
    out = tmp_path / "runs" / "r18"  # a parent that does not exist yet
    assert convert.write_run(out, "resnet18", variables, {}, source) == out
    assert sorted(p.name for p in out.parent.iterdir()) == ["r18"]  # no temporary left

    step, meta, restored = RunDir(out).restore_variables()
    assert step == 0
    jax.tree.map(np.testing.assert_array_equal, restored, variables)
    assert shapes(restored) == shapes(variables)
    assert meta["arch"] == "resnet18" and meta["num_classes"] == 1000
    assert meta["image_size"] == 224 and meta["in_channels"] == 3 and meta["model_options"] == {}
    assert meta["class_names"] == imagenet.wordnet_ids()
    assert meta["class_descriptions"][0] == imagenet.class_names()[0]
    assert meta["dataset"] == "imagenet2012" == imagenet.DATASET
    assert meta["preprocessing"] == imagenet.preprocessing()
    provenance = {"format": "torchvision", "file": str(source.absolute()), "sha256": sha256(source)}
    assert meta["converted_from"] == provenance
    config = json.loads((out / "config.json").read_text())
    assert config == {"arch": "resnet18", "dataset": "imagenet2012", "image_size": 224,
                      "model_options": {}, "converted_from": provenance}  # fmt: skip
    directory, located = warm_start.locate(str(out), "resnet18")
    assert directory == out / "checkpoints" and located["arch"] == "resnet18"
    with pytest.raises(cli.UsageError, match="not resnet34"):
        warm_start.locate(str(out), "resnet34")


def test_googlenet_run_records_its_options(tmp_path):
    sd = numpy_state_dict("googlenet")
    source = tmp_path / "g.safetensors"
    safetensors.numpy.save_file(sd, source)
    options = convert.model_options("googlenet", sd)
    variables = convert.from_torchvision("googlenet", sd)
    convert.write_run(tmp_path / "g", "googlenet", variables, options, source)
    _, meta, restored = RunDir(tmp_path / "g").restore_variables()
    assert meta["model_options"] == {"aux_logits": False, "transform_input": True}
    assert shapes(restored) == shapes(variables)


def test_write_run_refuses_an_occupied_out_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    # resnet18: the smallest network with BatchNorm statistics to write (alexnet is 5x larger)
    sd = numpy_state_dict("resnet18")
    source = tmp_path / "r.safetensors"
    safetensors.numpy.save_file(sd, source)
    variables = convert.from_torchvision("resnet18", sd)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(cli.UsageError, match="is not empty"):
        convert.write_run(occupied, "resnet18", variables, {}, source)
    with pytest.raises(cli.UsageError, match="is not a directory"):
        convert.write_run(source, "resnet18", variables, {}, source)
    assert sorted(p.name for p in occupied.iterdir()) == ["notes.txt"]

    from flaxcnn.training import rundir

    def disk_full(path, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rundir, "write_json_atomic", disk_full)
    with pytest.raises(cli.UsageError, match="No space left on device"):
        convert.write_run(tmp_path / "new", "resnet18", variables, {}, source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied", "r.safetensors"]

    monkeypatch.undo()
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory is fine: it is replaced
    convert.write_run(empty, "resnet18", variables, {}, source)
    assert RunDir(empty).has_checkpoint()


def test_write_run_refuses_an_unwritable_parent(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root may write anywhere: make the check see what a user would
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and access(p, mode))
    with pytest.raises(cli.UsageError, match="cannot write to"):
        convert.write_run(locked / "out", "alexnet", {"params": {}}, {}, tmp_path)
    assert list(locked.iterdir()) == []


# -- against torchvision ---------------------------------------------------------------------


def random_torchvision_model(arch: str, aux_logits: bool = False, seed: int = 0):
    """torchvision's model with its own random initialisation and BatchNorm layers that are
    not at their initial values (statistics and affine parameters perturbed)."""
    torch, torchvision = needs_torch()
    torch.manual_seed(seed)
    kwargs = {}
    if arch.startswith("vgg"):
        kwargs = {"init_weights": True}
    elif arch == "googlenet":
        kwargs = {"init_weights": True, "aux_logits": aux_logits}
    model = getattr(torchvision.models, arch)(weights=None, **kwargs)
    rng = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.5 * torch.randn(n, generator=rng))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=rng))
                module.weight.copy_(0.5 + torch.rand(n, generator=rng))
                module.bias.copy_(0.2 * torch.randn(n, generator=rng))
    return model


LOGIT_TOLERANCE = 1e-5
"""The largest relative logit difference accepted. With random weights and statistics the
differences are float32 summation order alone: 0.4e-6 to 2.0e-6 over every architecture at
224 and 145 (largest vgg19 at 224; jax 0.10.2, torch 2.14 on a 2-core Xeon, 2026-12-06).
5x the largest leaves room for other CPUs' kernels, and no more: a BatchNorm epsilon of
2e-5 instead of torch's 1e-5 shows as 2.4e-5 (vgg11_bn, 145) to 5.6e-5 (resnet18, 224),
which the former bound of 1e-4 let through; a misplaced weight as 1e-3 or more
(test_verify_sees_a_wrong_weight)."""

# 224: the pretrained weights' size. 145: odd, where ceil-mode pools and adaptive pools with
# uneven bins show any misalignment. Deeper members of a family (VGG-13 and up, ResNet-101
# and up) repeat their lighter siblings' layers (more blocks, more convolutions per stage)
# and are compared at 224 only, their sibling (VGG-11, ResNet-50) at both. The quick
# lane compares one ResNet at 224 and AlexNet at 145 (each under 3 s); the rest is slow.
QUICK_LOGITS = {("resnet18", 224), ("alexnet", 145)}


def logit_cases() -> list:
    return [
        pytest.param(
            arch,
            aux,
            size,
            id=f"{arch}{'-aux' if aux else ''}-{size}",
            marks=[] if (arch, size) in QUICK_LOGITS and not aux else [pytest.mark.slow],
        )
        for arch in convert.ARCHS
        for aux in ((False, True) if arch == "googlenet" else (False,))
        for size in ((224,) if arch in HEAVY else (224, 145))
    ]


_CONVERTED: dict = {}


def converted(arch: str, aux: bool) -> tuple:
    """(state_dict, options, variables) of a random torchvision `arch`, kept for the next
    size of the same architecture (the cases run in that order) and only that long: VGG's
    take 1 GB."""
    if (arch, aux) not in _CONVERTED:
        _CONVERTED.clear()
        gc.collect()
        state_dict = random_torchvision_model(arch, aux).state_dict()
        options = convert.model_options(arch, state_dict)
        variables = convert.from_torchvision(arch, state_dict)
        _CONVERTED[arch, aux] = (state_dict, options, variables)
    return _CONVERTED[arch, aux]


@pytest.fixture(scope="module", autouse=True)
def _release_converted():
    yield
    _CONVERTED.clear()


@pytest.mark.parametrize("arch, aux, size", logit_cases())
def test_logits_match_torchvision(arch, aux, size):
    """Same logits as torchvision's model holding the same weights, at `size` x `size`."""
    state_dict, options, variables = converted(arch, aux)
    differences = convert.verify(arch, state_dict, variables, options, sizes=(size,))
    print(f"{arch}{'-aux' if aux else ''}: {differences}")
    assert set(differences) == {size}
    assert differences[size] <= LOGIT_TOLERANCE, differences


def test_verify_sees_a_wrong_weight():
    state_dict = random_torchvision_model("resnet18").state_dict()
    variables = convert.from_torchvision("resnet18", state_dict)
    kernel = variables["params"]["conv1"]["kernel"]  # a conversion bug: kh and kw swapped
    variables["params"]["conv1"]["kernel"] = np.ascontiguousarray(kernel.transpose(1, 0, 2, 3))
    assert convert.verify("resnet18", state_dict, variables, {})[224] > 1e-3


def test_verify_failure_writes_nothing(tmp_path, monkeypatch, capsys):
    needs_torch()
    source = tmp_path / "r18.safetensors"
    safetensors.numpy.save_file(numpy_state_dict("resnet18"), source)
    monkeypatch.setattr(convert, "verify", lambda *args, **kwargs: {224: 3e-3})
    out = tmp_path / "out"
    args = ["--arch", "resnet18", "--state-dict", str(source), "--out", str(out), "--verify"]
    with pytest.raises(SystemExit) as e:
        convert.main(args)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(source) in err[0] and "3.00e-03" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r18.safetensors"]


class CreatesMarker:
    """Unpickling this would create a file: a stand-in for a pickle that runs code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class RunsCommand:
    """Unpickling this would run a shell command (`os.system`) that creates a file."""

    def __init__(self, path):
        self.command = f"touch {path}"

    def __reduce__(self):
        return (os.system, (self.command,))


class Arbitrary:
    """A class of the program that saved the file."""

    def __init__(self):
        self.weight = [1.0, 2.0]


def a_function():
    """A function saved by reference."""


def test_pytorch_files_read_safely(tmp_path):
    torch, _ = needs_torch()
    marker = tmp_path / "marker"
    torch.save({"conv1.weight": CreatesMarker(marker)}, tmp_path / "evil.pth")
    with pytest.raises(cli.UsageError, match="refused unread") as e:
        convert.read_state_dict(tmp_path / "evil.pth")
    assert not marker.exists() and "\n" not in str(e.value)
    with (tmp_path / "plain.pkl").open("wb") as f:
        pickle.dump({"w": CreatesMarker(marker)}, f, protocol=2)
    with pytest.raises(cli.UsageError, match=r"other than tensors \(_?io\.open\); refused unread"):
        convert.read_state_dict(tmp_path / "plain.pkl")
    with (tmp_path / "plain4.pkl").open("wb") as f:
        pickle.dump({"w": CreatesMarker(marker)}, f, protocol=4)
    with pytest.raises(cli.UsageError, match=r"other than tensors \(_?io\.open\); refused unread"):
        convert.read_state_dict(tmp_path / "plain4.pkl")
    assert not marker.exists()

    import zipfile

    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "not a checkpoint")
    with pytest.raises(cli.UsageError, match="is not a PyTorch checkpoint"):
        convert.read_state_dict(tmp_path / "other.zip")
    torch.save({"epoch": 3, "state_dict": {"w": torch.ones(2)}}, tmp_path / "ckpt.pth")
    with pytest.raises(cli.UsageError, match="'epoch' holds a int, not a tensor"):
        convert.read_state_dict(tmp_path / "ckpt.pth")
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "nested.pth")
    with pytest.raises(cli.UsageError, match=r"save model\.state_dict"):
        convert.read_state_dict(tmp_path / "nested.pth")

    torch.save({"w": torch.tensor([1.5, -2.0], dtype=torch.bfloat16)}, tmp_path / "bf16.pth")
    read = convert.read_state_dict(tmp_path / "bf16.pth")
    assert read["w"].dtype == np.float32 and read["w"].tolist() == [1.5, -2.0]


# -- the command line (resnet18: each call costs seconds of imports) -------------------------


def test_help_and_import_need_neither_jax_nor_torch():
    code = (
        "import sys, flaxcnn.convert\n"
        "heavy = {'jax', 'torch', 'flax', 'orbax'} & {m.split('.')[0] for m in sys.modules}\n"
        "assert not heavy, heavy\n"
        "flaxcnn.convert.main(['--help'])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--state-dict FILE" in done.stdout and "googlenet" in done.stdout


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "flaxcnn.convert", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
    """A random resnet18 state_dict as .pth (torch.save) and .safetensors (numpy)."""
    torch, _ = needs_torch()
    folder = tmp_path_factory.mktemp("resnet18")
    state_dict = random_torchvision_model("resnet18", seed=3).state_dict()
    torch.save(state_dict, folder / "resnet18.pth")
    arrays = {k: v.numpy() for k, v in state_dict.items()}
    safetensors.numpy.save_file(arrays, folder / "resnet18.safetensors")
    return folder


@pytest.mark.slow  # two conversions, a --verify and an evaluate, each in its own process
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_cli_converts_and_the_run_is_usable(resnet18_files, tmp_path, suffix):
    source = resnet18_files / f"resnet18{suffix}"
    out = tmp_path / "converted"
    verify = ["--verify"] if suffix == ".pth" else []
    done = run_cli("--arch", "resnet18", "--state-dict", source, "--out", out, *verify)
    assert done.returncode == 0, done.stderr
    assert "11,689,512" in done.stdout and str(out) in done.stdout
    assert "python -m flaxcnn.predict --workdir" in done.stdout
    assert f"--init-from {out}" in done.stdout
    if verify:
        assert "largest relative logit difference" in done.stdout
    _, meta, restored = RunDir(out).restore_variables()
    expected = convert.from_torchvision("resnet18", convert.read_state_dict(source))
    jax.tree.map(np.testing.assert_array_equal, restored, expected)
    assert meta["converted_from"]["sha256"] == sha256(source)
    warm_start.locate(str(out), "resnet18")
    if suffix == ".safetensors":  # once is enough: evaluate reads the run, then needs data
        data_dir = tmp_path / "tfds"
        data_dir.mkdir()
        evaluated = subprocess.run(
            [sys.executable, "-m", "flaxcnn.evaluate", "--workdir", str(out)],
            capture_output=True,
            text=True,
            env={**os.environ, "TFDS_DATA_DIR": str(data_dir)},
            timeout=300,
        )
        assert evaluated.returncode == 2, evaluated.stderr
        lines = evaluated.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "imagenet2012" in lines[0]
        assert "not prepared" in lines[0]


def _bad_input(kind, folder: Path, tmp: Path) -> tuple[list, str, list[str]]:
    """(arguments, the file the message must name, other things it must say) of a case."""
    torch, _ = needs_torch()
    sd = safetensors.numpy.load_file(folder / "resnet18.safetensors")
    r18 = folder / "resnet18.safetensors"
    file = tmp / f"{kind}.safetensors"
    if kind == "wrong-arch":
        return ["--arch", "resnet34", "--state-dict", r18], r18, [
            "missing key 'layer1.2.conv1.weight'", "those of resnet18"]  # fmt: skip
    if kind == "extra-key":
        safetensors.numpy.save_file({**sd, "head.weight": np.zeros(3, np.float32)}, file)
        return ["--arch", "resnet18", "--state-dict", file], file, ["unexpected key 'head.weight'"]
    if kind == "missing-key":
        sd.pop("layer4.1.conv2.weight")
        safetensors.numpy.save_file(sd, file)
        return ["--arch", "resnet18", "--state-dict", file], file, ["'layer4.1.conv2.weight'"]
    if kind == "shape":
        sd["fc.weight"] = np.zeros((10, 512), np.float32)
        safetensors.numpy.save_file(sd, file)
        return ["--arch", "resnet18", "--state-dict", file], file, [
            "'fc.weight' has shape (10, 512), resnet18 expects (1000, 512)"]  # fmt: skip
    names = {"text": "weights.txt", "directory": "weights", "empty": "empty.pth",
             "random": "random.pth", "missing": "absent.pth", "pickle": "evil.pth",
             "list": "list.pth", "bad-arch": "x.pth", "out-occupied": "x.pth"}  # fmt: skip
    file = tmp / names[kind]
    args = ["--arch", "resnet18", "--state-dict", file]
    if kind == "text":
        file.write_text("these are not the weights you are looking for\n")
        return args, file, ["is not a PyTorch checkpoint"]
    if kind == "directory":
        file.mkdir()
        return args, file, ["is a directory"]
    if kind == "empty":
        file.write_bytes(b"")
        return args, file, ["is empty"]
    if kind == "random":
        file.write_bytes(np.random.default_rng(0).bytes(5000))
        return args, file, ["is not a PyTorch checkpoint"]
    if kind == "missing":
        return args, file, ["no such file"]
    if kind == "pickle":
        torch.save({"conv1.weight": RunsCommand(tmp / "marker")}, file)
        return args, file, ["(posix.system); refused unread"]
    if kind == "list":
        torch.save([torch.zeros(3)], file)
        return args, file, ["holds a list, not a state_dict"]
    if kind == "bad-arch":
        return ["--arch", "resnet19", "--state-dict", r18], "resnet19", ["invalid choice"]
    assert kind == "out-occupied"
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("keep me")
    return ["--arch", "resnet18", "--state-dict", r18], tmp / "out", ["not empty"]


BAD_INPUTS = ["wrong-arch", "extra-key", "missing-key", "shape", "text", "empty", "random",
              "directory", "missing", "pickle", "list", "bad-arch", "out-occupied"]  # fmt: skip


# Run as `python -m flaxcnn.convert` in a process of their own: one case for each way in (a
# bad argument, a .safetensors file, a .pth file through torch), so that nothing an import
# prints can slip past the one-line check. The others call the same `main` in this process.
IN_A_PROCESS = {"bad-arch", "wrong-arch", "pickle"}


def main_here(capsys, args: list) -> tuple[int, str, str]:
    """`convert.main(args)` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        convert.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_cli_refuses_bad_input_with_one_line_and_writes_nothing(
    resnet18_files, tmp_path, kind, capsys
):
    args, named, says = _bad_input(kind, resnet18_files, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    if kind in IN_A_PROCESS:
        done = run_cli(*args, "--out", out)
        code, stdout, stderr = done.returncode, done.stdout, done.stderr
    else:
        code, stdout, stderr = main_here(capsys, [*args, "--out", out])
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert str(named) in lines[0]
    for text in says:
        assert text in lines[0]
    assert stdout == "" and "weights_only" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out, no .out.tmp-*
    if kind == "out-occupied":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "marker").exists()


# (what the file holds, how it is saved, what the one line says besides the file's name)
PAYLOADS = {
    "os.system": (RunsCommand, "torch", "(posix.system); refused unread"),
    "os.system, plain pickle": (RunsCommand, 4, "(posix.system); refused unread"),
    "open": (CreatesMarker, "torch", "io.open); refused unread"),  # _io.open, io.open
    "a class": (lambda marker: Arbitrary(), "torch", f"({__name__}.Arbitrary); refused unread"),
    "a function": (lambda marker: a_function, "torch", f"({__name__}.a_function); refused"),
    "a set, plain pickle": (lambda marker: {1, 2}, 4, "other than tensors; refused unread"),
    "a set": (lambda marker: {1, 2}, "torch", "'conv1.weight' holds a set, not a tensor"),
}


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_pickles_of_python_objects_are_refused_in_one_line(tmp_path, capsys, payload):
    """Whatever a pickle holds and however torch words its refusal, one line saying so and
    never torch's advice to re-run with weights_only=False; nothing in the file runs."""
    torch, _ = needs_torch()
    make, saved_with, says = PAYLOADS[payload]
    marker, file = tmp_path / "marker", tmp_path / "evil.pth"
    state_dict = {"conv1.weight": make(marker)}
    if saved_with == "torch":
        torch.save(state_dict, file)
    else:
        with file.open("wb") as f:
            pickle.dump(state_dict, f, protocol=saved_with)
    args = ["--arch", "resnet18", "--state-dict", file, "--out", tmp_path / "out"]
    code, out, err = main_here(capsys, args)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {file}") and err.count("\n") == 1, err
    assert says in err and "weights_only" not in err
    assert not marker.exists() and not (tmp_path / "out").exists()
