"""`python -m flaxcnn.convert`: torchvision weights as flaxcnn variables and a run directory.

The ImageNet networks here follow torchvision's layouts exactly, so converting a
torchvision `state_dict` is a renaming plus two transposes:

    torchvision                          flaxcnn
    layer2.0.downsample.1.running_var    batch_stats/layer2_0/downsample_1/var
    inception4a.branch2.1.conv.weight    params/inception4a/branch2_1/conv/kernel
    features.{i} (vgg, alexnet)          params/conv{k}/conv (+ conv{k}/bn for vgg*_bn)
    classifier.{i} (vgg, alexnet)        params/classifier/fc1, fc2, fc3
    Conv2d weight (out, in, kh, kw)      kernel (kh, kw, in, out)
    Linear weight (out, in)              kernel (in, out)
    BatchNorm weight, bias               params scale, bias
    running_mean, running_var            batch_stats mean, var (num_batches_tracked ignored)

The expected names and shapes are derived from the Flax model itself (`jax.eval_shape` of
its `init`, nothing compiled), so the table above is code only for VGG's and AlexNet's
`features.{i}` indices. Every key is checked (missing, unexpected, shape, dtype, finite)
before anything is written; a mismatch names the first offending key, and the architecture
the keys belong to when they are another one's.

    python -m flaxcnn.convert --arch resnet50 --state-dict resnet50.pth --out runs/r50 --verify

reads a `.pth` (torch's own `weights_only` loader: no code in the file can run) or a
`.safetensors` file (no torch needed), converts it, optionally checks the logits against
torchvision's model (`--verify`, needs torch), and writes a run directory whose checkpoint
`flaxcnn.evaluate`, `flaxcnn.predict` and `flaxcnn.train --init-from` read; the file I/O is
in `flaxcnn.convert_io`. jax and torch are imported inside the functions that need them, so
that --help and bad arguments answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from flaxcnn import cli
from flaxcnn.convert_io import check_out, read_state_dict, write_run

__all__ = [
    "ARCHS",
    "ConversionError",
    "from_torchvision",
    "main",
    "model_options",
    "read_state_dict",
    "state_dict_shapes",
    "verify",
    "write_run",
]

ARCHS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
    "alexnet", "googlenet",
)  # fmt: skip
VERIFY_TOLERANCE = 1e-4  # largest relative logit difference `--verify` accepts
NUM_BATCHES_TRACKED = "num_batches_tracked"

# Flax variable name -> torch's, per collection; the order is torch's within a module.
_LEAVES = {
    "params": {"kernel": "weight", "scale": "weight", "bias": "bias"},
    "batch_stats": {"mean": "running_mean", "var": "running_var"},
}
_LEAF_ORDER = ("kernel", "scale", "bias", "mean", "var")
# torchvision's classifier Sequential indices of the three Linear layers.
_CLASSIFIER = {"vgg": (0, 3, 6), "alexnet": (1, 4, 6)}
_SEQUENTIAL_INDEX = re.compile(r"_(\d+)$")


class ConversionError(ValueError):
    """A state_dict that does not fit the architecture; one line naming the first bad key."""


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One torch tensor and where it goes: `variables[collection][path...]`."""

    collection: str
    path: tuple[str, ...]
    torch_shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The torch keys an architecture's variables come from, in the model's order."""

    entries: dict[str, _Entry]
    ignored: frozenset[str]  # the BatchNorm layers' num_batches_tracked


# -- names -------------------------------------------------------------------------------


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ConversionError(
            f"cannot convert architecture {arch!r}; torchvision weights convert for: "
            + ", ".join(ARCHS)
        )


def model_options(arch: str, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The flaxcnn model options these weights need: {} except for googlenet, whose
    auxiliary heads exist iff the weights have them and whose input is remapped as
    torchvision does for its pretrained weights (`transform_input`)."""
    _check_arch(arch)
    if arch != "googlenet":
        return {}
    aux = any(isinstance(k, str) and k.startswith(("aux1.", "aux2.")) for k in state_dict)
    return {"aux_logits": aux, "transform_input": True}


def _module_renames(arch: str) -> dict[tuple[str, ...], str]:
    """Flax module paths whose torch names are not the generic rule's: VGG's and AlexNet's
    `features.{i}` (counted as torchvision's `make_layers` counts) and `classifier.{i}`."""
    from flaxcnn import models
    from flaxcnn.models import alexnet

    renames: dict[tuple[str, ...], str] = {}
    if arch.startswith("vgg"):
        family, model, index, k = "vgg", models.create(arch), 0, 0
        for v in model.config:
            if v == "M":  # MaxPool2d
                index += 1
                continue
            k += 1
            renames[(f"conv{k}", "conv")] = f"features.{index}"
            if model.batch_norm:
                renames[(f"conv{k}", "bn")] = f"features.{index + 1}"
            index += 3 if model.batch_norm else 2  # Conv2d, (BatchNorm2d), ReLU
    elif arch == "alexnet":
        family, index = "alexnet", 0
        for k, (*_, pool) in enumerate(alexnet.FEATURES, start=1):
            renames[(f"conv{k}", "conv")] = f"features.{index}"
            index += 3 if pool else 2  # Conv2d, ReLU, (MaxPool2d)
    else:
        return renames
    for j, i in enumerate(_CLASSIFIER[family], start=1):
        renames[("classifier", f"fc{j}")] = f"classifier.{i}"
    return renames


def _torch_module(module: tuple[str, ...], renames: dict[tuple[str, ...], str]) -> str:
    """`("layer2_0", "downsample_1")` -> "layer2.0.downsample.1" (or a rename of a prefix)."""
    for n in range(len(module), 0, -1):
        if module[:n] in renames:
            return ".".join([renames[module[:n]], *module[n:]])
    return ".".join(_SEQUENTIAL_INDEX.sub(r".\1", name) for name in module)


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:  # (in, out) -> (out, in)
        return (shape[1], shape[0])
    return shape


@functools.cache
def _layout(arch: str, aux_logits: bool) -> _Layout:
    """The expected torch keys of `arch`, from `jax.eval_shape` of the model's init (cached:
    a fraction of a second each, nothing compiled)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from flaxcnn import models

    options = {"aux_logits": aux_logits} if arch == "googlenet" else {}
    model = models.create(arch, **options)
    order: dict[tuple[str, ...], int] = {}

    def record(next_fun, args, kwargs, context):  # modules in the order they are called
        order.setdefault(tuple(context.module.path), len(order))
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    with nn.intercept_methods(record):
        variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    leaves = []
    for collection in ("params", "batch_stats"):
        flat = jax.tree_util.tree_flatten_with_path(variables.get(collection, {}))[0]
        for keys, leaf in flat:
            path = tuple(k.key for k in keys)
            leaves.append((collection, path, tuple(leaf.shape)))
    leaves.sort(key=lambda e: (order.get(e[1][:-1], len(order)), _LEAF_ORDER.index(e[1][-1])))
    renames = _module_renames(arch)
    entries, ignored = {}, set()
    for collection, path, shape in leaves:
        module = _torch_module(path[:-1], renames)
        key = f"{module}.{_LEAVES[collection][path[-1]]}"
        entries[key] = _Entry(collection, path, _torch_shape(shape))
        if collection == "batch_stats":
            ignored.add(f"{module}.{NUM_BATCHES_TRACKED}")
    return _Layout(entries, frozenset(ignored))


def state_dict_shapes(arch: str, aux_logits: bool = False) -> dict[str, tuple[int, ...]]:
    """The names and shapes of torchvision's state_dict of `arch` (num_batches_tracked left
    out), in the model's order: what `from_torchvision` expects. `aux_logits`: googlenet's
    auxiliary heads."""
    _check_arch(arch)
    layout = _layout(arch, bool(aux_logits) and arch == "googlenet")
    return {key: entry.torch_shape for key, entry in layout.entries.items()}


def _candidates() -> list[tuple[str, bool]]:
    return [(a, aux) for a in ARCHS for aux in ((False, True) if a == "googlenet" else (False,))]


def _describe(arch: str, aux_logits: bool) -> str:
    return f"{arch} with aux_logits" if aux_logits else arch


# A key every torchvision network of a family has: only those families' layouts are built.
_FAMILY_KEY = {"resnet": "layer1.0.conv1.weight", "vgg": "features.0.weight",
               "alexnet": "features.0.weight", "googlenet": "conv1.conv.weight"}  # fmt: skip


def _matching_arch(keys: set[str], exclude: tuple[str, bool]) -> str | None:
    """The architecture whose torch keys are exactly `keys` (num_batches_tracked aside)."""
    keys = {k for k in keys if not k.endswith(f".{NUM_BATCHES_TRACKED}")}
    for candidate in _candidates():
        family = re.match(r"[a-z]+", candidate[0]).group()
        if candidate == exclude or _FAMILY_KEY[family] not in keys:
            continue
        if set(_layout(*candidate).entries) == keys:
            return _describe(*candidate)
    return None


# -- conversion ----------------------------------------------------------------------------


def _as_array(key: str, value: Any) -> np.ndarray:
    """`value` as a floating-point numpy array; ConversionError naming `key` otherwise."""
    import jax.numpy as jnp

    try:
        array = np.asarray(value)
    except Exception:
        # torch tensors numpy cannot take as they are (bfloat16, on a GPU, requiring grad)
        try:
            array = np.asarray(value.detach().cpu().float())
        except Exception:
            raise ConversionError(f"{key!r} is a {type(value).__name__}, not an array") from None
    if jnp.issubdtype(array.dtype, jnp.floating):
        return array
    if array.dtype.kind in "OSUV":
        raise ConversionError(f"{key!r} is a {type(value).__name__}, not an array")
    raise ConversionError(f"{key!r} holds {array.dtype} values, not floating-point numbers")


def _convert(key: str, array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        bad = int(array.size - np.isfinite(array).sum())
        raise ConversionError(f"{key!r} has {bad} non-finite value(s) (NaN or infinity)")
    if key.endswith(".running_var") and (array < 0).any():
        raise ConversionError(f"{key!r} has negative values (a variance cannot be negative)")
    if array.ndim == 4:
        array = array.transpose(2, 3, 1, 0)
    elif array.ndim == 2:
        return _transposed(array)
    return np.ascontiguousarray(array, dtype=np.float32)


def _transposed(matrix: np.ndarray, tile: int = 256) -> np.ndarray:
    """`matrix.T` as a new C-contiguous array, copied tile by tile: one copy of a large
    transposed matrix walks memory a column at a time (VGG's 4096 x 25088 classifier
    weight: 0.59 s, against 0.29 s in tiles of 256, on a 2-core AMD EPYC)."""
    rows, columns = matrix.shape
    out = np.empty((columns, rows), np.float32)
    for i in range(0, rows, tile):
        for j in range(0, columns, tile):
            out[j : j + tile, i : i + tile] = matrix[i : i + tile, j : j + tile].T
    return out


def from_torchvision(arch: str, state_dict: Mapping[str, Any]) -> dict[str, dict]:
    """torchvision `state_dict` of `arch` -> {"params", "batch_stats"} of float32 numpy arrays,
    exactly the tree `models.create(arch, **model_options(arch, state_dict)).init(...)` has
    (batch_stats {} for networks without BatchNorm).

    The values may be numpy arrays, torch tensors or anything `np.asarray` takes. Raises
    ConversionError, naming the first offending key, for an architecture not in ARCHS, a
    missing or unexpected key (saying which architecture the keys are, if another one's),
    a shape that differs, a value that is not an array of floats, or non-finite values.
    """
    _check_arch(arch)
    if not isinstance(state_dict, Mapping):
        raise ConversionError(
            f"a state_dict maps names to arrays; got a {type(state_dict).__name__}"
        )
    for key in state_dict:
        if not isinstance(key, str):
            raise ConversionError(f"key {key!r} is not a name (a {type(key).__name__})")
    aux = bool(model_options(arch, state_dict).get("aux_logits"))
    layout = _layout(arch, aux)
    missing = [k for k in layout.entries if k not in state_dict]
    unexpected = [k for k in state_dict if k not in layout.entries and k not in layout.ignored]
    if missing or unexpected:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
                parts.append(f"{what} key {keys[0]!r}{more}")
        match = _matching_arch(set(state_dict), exclude=(arch, aux))
        hint = f" (the keys are those of {match})" if match else ""
        raise ConversionError(f"{', '.join(parts)} for {_describe(arch, aux)}{hint}")

    variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for key, entry in layout.entries.items():
        array = _as_array(key, state_dict[key])
        if tuple(array.shape) != entry.torch_shape:
            raise ConversionError(
                f"{key!r} has shape {tuple(array.shape)}, {arch} expects {entry.torch_shape}"
            )
        node = variables[entry.collection]
        for name in entry.path[:-1]:
            node = node.setdefault(name, {})
        node[entry.path[-1]] = _convert(key, array)
    return variables


def count_params(variables: Mapping[str, Any]) -> int:
    import jax

    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(variables.get("params", {})))


# -- verification ----------------------------------------------------------------------------


def torchvision_model(arch: str, options: Mapping[str, Any] | None = None, empty: bool = False):
    """torchvision's `arch` without pretrained weights or (where it can) initialisation;
    `empty`: on torch's meta device, without memory or values, for `load_state_dict(...,
    assign=True)` to fill (VGG-16's random initialisation took 0.6 s)."""
    import torch
    import torchvision

    _check_arch(arch)
    options = dict(options or {})
    kwargs: dict[str, Any] = {}
    if arch.startswith("vgg"):
        kwargs["init_weights"] = False
    elif arch == "googlenet":
        kwargs["init_weights"] = False
        kwargs["aux_logits"] = bool(options.get("aux_logits", False))
        kwargs["transform_input"] = bool(options.get("transform_input", False))
    with torch.device("meta") if empty else contextlib.nullcontext():
        return getattr(torchvision.models, arch)(weights=None, **kwargs)


def _torch_state_dict(state_dict: Mapping[str, Any]) -> dict:
    import torch

    out = {}
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            out[key] = value
            continue
        array = np.asarray(value)
        if array.dtype.kind not in "iub":
            array = array.astype(np.float32)
        out[key] = torch.from_numpy(np.array(array, copy=True))
    return out


def verify(
    arch: str,
    state_dict: Mapping[str, Any],
    variables: Mapping[str, Any],
    options: Mapping[str, Any],
    sizes: tuple[int, ...] = (224,),
) -> dict[int, float]:
    """{size: largest relative logit difference} between torchvision's `arch` holding
    `state_dict` and flaxcnn's holding `variables`, on the same random images (seeded,
    batch 2, `size` x `size`), both in eval mode, float32; the difference is
    `max|flax - torch| / max|torch|`. Needs torch and torchvision."""
    import jax
    import torch

    from flaxcnn import models

    torch_state = _torch_state_dict(state_dict)
    torch_model = torchvision_model(arch, options, empty=True)
    torch_model.load_state_dict(torch_state, strict=True, assign=True)
    if any(t.is_meta for t in (*torch_model.parameters(), *torch_model.buffers())):
        torch_model = torchvision_model(arch, options)  # a tensor the state_dict does not hold
        torch_model.load_state_dict(torch_state, strict=True)
    torch_model.float().eval()
    flax_model = models.create(arch, **options)
    apply = jax.jit(lambda v, x: flax_model.apply(v, x, train=False))
    device_variables = jax.device_put(dict(variables))
    rng = np.random.default_rng(0)
    differences = {}
    try:
        for size in sizes:
            x = rng.standard_normal((2, 3, size, size)).astype(np.float32)
            with torch.inference_mode():
                expected = torch_model(torch.from_numpy(x)).numpy()
            actual = np.asarray(apply(device_variables, x.transpose(0, 2, 3, 1)))
            scale = float(np.abs(expected).max())
            if not scale > 1e-6:  # all (near) zero: a relative difference would mean nothing
                raise ConversionError(
                    f"torchvision's {arch} gives logits of at most {scale:.1e} at {size}x{size}: "
                    "too small to compare (are these trained weights?)"
                )
            differences[size] = float(np.abs(actual - expected).max()) / scale
    finally:
        del torch_model
    return differences


# -- the command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m flaxcnn.convert",
        description="Convert a torchvision state_dict (.pth, or .safetensors without torch) "
        "into a flaxcnn run directory that flaxcnn.evaluate, flaxcnn.predict and "
        "flaxcnn.train --init-from read.",
    )
    parser.add_argument("--arch", required=True, choices=ARCHS, metavar="ARCH",
                        help=f"the torchvision architecture: {', '.join(ARCHS)}")  # fmt: skip
    parser.add_argument(
        "--state-dict",
        required=True,
        metavar="FILE",
        help="the weights: torch.save(model.state_dict()) (.pth, .pt; read with "
        "weights_only, needs torch) or a .safetensors file",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="the run directory to write (must not exist)"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="compare the logits with torchvision's model at 224x224 first and write nothing "
        f"if they differ by more than {VERIFY_TOLERANCE:g} (needs torch)",
    )
    return parser


def _train_command(arch: str, out: Path, options: Mapping[str, Any]) -> str:
    from flaxcnn.training.warm_start import FREE_OPTIONS

    fixed = "".join(
        f" --model-option {k}={str(v).lower()}"
        for k, v in sorted(options.items())
        if k not in FREE_OPTIONS and v
    )
    return f"python -m flaxcnn.train --arch {arch} --init-from {out}{fixed} --dataset ..."


def run(args: argparse.Namespace) -> list[str]:
    """Convert as the command line asks; the lines to print. UsageError for bad input."""
    import importlib.util

    out = check_out(args.out)
    source = Path(args.state_dict)
    if args.verify and not all(importlib.util.find_spec(m) for m in ("torch", "torchvision")):
        raise cli.UsageError("--verify needs torch and torchvision: pip install 'flaxcnn[torch]'")
    state_dict = read_state_dict(source)
    try:
        options = model_options(args.arch, state_dict)
        variables = from_torchvision(args.arch, state_dict)
    except ConversionError as e:
        raise cli.UsageError(f"{source}: {e}") from None
    lines = [
        f"converted {args.arch} from {source}",
        f"  parameters   {count_params(variables):,}",
    ]
    if options:
        lines.append("  options      " + ", ".join(f"{k}={v}" for k, v in options.items()))
    if args.verify:
        try:
            difference = verify(args.arch, state_dict, variables, options, sizes=(224,))[224]
        except ConversionError as e:
            raise VerifyFailed(f"{source}: {e}; nothing written") from None
        if not difference <= VERIFY_TOLERANCE:
            raise VerifyFailed(
                f"{source}: the converted {args.arch} differs from torchvision's by "
                f"{difference:.2e} (relative, largest logit; more than {VERIFY_TOLERANCE:g}); "
                "nothing written. Please report this with your torchvision version"
            )
        lines.append(
            f"  verified     largest relative logit difference {difference:.2e} at 224x224"
        )
    del state_dict
    written = write_run(out, args.arch, variables, options, source)
    lines += [
        f"  wrote        {written}",
        "next:",
        f"  python -m flaxcnn.predict --workdir {written} photo.jpg",
        f"  python -m flaxcnn.evaluate --workdir {written}   (needs imagenet2012 prepared)",
        f"  {_train_command(args.arch, written, options)}",
    ]
    return lines


class VerifyFailed(RuntimeError):
    """`--verify` found the logits too different: not bad input, a failure (exit 1)."""


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        lines = run(args)
    except cli.UsageError as e:
        cli.fail(str(e))
    except VerifyFailed as e:
        cli.fail(str(e), code=1)
    print("\n".join(lines))


if __name__ == "__main__":
    cli.run_main(main)
