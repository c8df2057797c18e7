"""Count parameters and multiply-adds without compiling anything.

Everything here runs under `jax.eval_shape`, so even VGG-19 or ResNet-152 at 224x224 is
summarised in seconds on a laptop. Multiply-adds count convolutions and dense layers
only, per image, the convention behind torchvision's published "GFLOPS".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxcnn.models import layers


@dataclasses.dataclass(frozen=True)
class LayerRow:
    path: str
    kind: str
    output_shape: Any
    params: int
    macs: int


def _input(input_shape: Sequence[int]) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)


def init_shapes(model: nn.Module, input_shape: Sequence[int]) -> dict:
    """Shapes of every variable collection, from an abstract init in train mode.

    Train mode so that train-only branches (e.g. GoogLeNet's auxiliary heads) exist.
    """
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    return jax.eval_shape(lambda x: model.init(rngs, x, train=True), _input(input_shape))


def count_params(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Trainable parameters (BatchNorm running statistics are not parameters)."""
    return tree_size(init_shapes(model, input_shape)["params"])


def tree_size(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _layer_macs(module: nn.Module, args: tuple, out: Any) -> int:
    if isinstance(module, nn.Conv):
        in_features = args[0].shape[-1] // module.feature_group_count
        return math.prod(out.shape) * math.prod(module.kernel_size) * in_features
    if isinstance(module, nn.Dense):
        return math.prod(out.shape) * args[0].shape[-1]
    return 0


def _subtree(params: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        params = params.get(key, {}) if isinstance(params, dict) else {}
    return params


def layer_table(
    model: nn.Module, input_shape: Sequence[int], depth: int | None = None
) -> list[LayerRow]:
    """One row per module at `depth` (None: every innermost layer), in call order, and
    one per pooling (`layers.max_pool` and the like), a layer without parameters.

    A row's parameters and multiply-adds include everything inside it, so the rows of any
    depth add up to the whole network. `input_shape` is NHWC; MACs are per image.
    """
    calls: dict[tuple[str, ...], list] = {}  # path -> [kind, output shape, MACs]
    inside: list[tuple[str, ...]] = []  # the paths of the modules running now
    pools: dict[tuple[tuple[str, ...], str], int] = {}  # (module, kind) -> pools so far

    def record(next_fun, args, kwargs, context):
        inside.append(tuple(context.module.path))
        try:
            out = next_fun(*args, **kwargs)
        finally:
            inside.pop()
        if context.method_name == "__call__":
            module = context.module
            entry = calls.setdefault(tuple(module.path), [type(module).__name__, None, 0])
            entry[1] = jax.tree.map(lambda a: tuple(a.shape), out)
            entry[2] += _layer_macs(module, args, out)
        return out

    def record_pool(kind: str, out: jax.Array) -> None:
        """A pooling function's row, named as Flax names an unnamed module (MaxPool_0)."""
        parent = inside[-1] if inside else ()
        index = pools[parent, kind] = pools.get((parent, kind), -1) + 1
        calls[(*parent, f"{kind}_{index}")] = [kind, tuple(out.shape), 0]

    variables = init_shapes(model, input_shape)
    with nn.intercept_methods(record), layers.observe_pooling(record_pool):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, _input(input_shape))

    paths = [p for p in calls if p]
    if depth is not None:
        paths = [p for p in paths if len(p) <= depth]
    frontier = [p for p in paths if not any(q[: len(p)] == p and q != p for q in paths)]
    batch = input_shape[0]
    rows = []
    for path in frontier:
        kind, shape, _ = calls[path]
        macs = sum(c[2] for q, c in calls.items() if q[: len(path)] == path)
        rows.append(
            LayerRow(
                path="/".join(path),
                kind=kind,
                output_shape=shape,
                params=tree_size(_subtree(variables["params"], path)),
                macs=macs // batch,
            )
        )
    return rows


def total_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Forward multiply-adds per image, in eval mode."""
    return sum(row.macs for row in layer_table(model, input_shape, depth=1))


def format_table(rows: Sequence[LayerRow], total_params: int | None = None) -> str:
    """A plain-text table with totals; `total_params` includes train-only branches."""
    header = ("layer", "type", "output shape", "params", "MACs")
    body = [
        (r.path, r.kind, _shape_str(r.output_shape), f"{r.params:,}", f"{r.macs:,}") for r in rows
    ]
    params = sum(r.params for r in rows) if total_params is None else total_params
    macs = sum(r.macs for r in rows)
    footer = ("total", "", "", f"{params:,}", f"{macs:,}")
    widths = [max(len(row[i]) for row in [header, *body, footer]) for i in range(5)]

    def line(row):
        left = [row[i].ljust(widths[i]) for i in range(3)]
        right = [row[i].rjust(widths[i]) for i in range(3, 5)]
        return "  ".join(left + right).rstrip()

    rule = "-" * len(line(header))
    return "\n".join(
        [
            line(header),
            rule,
            *map(line, body),
            rule,
            line(footer),
            f"multiply-adds per image: {in_words(macs)}",
        ]
    )


def in_words(count: int) -> str:
    """A count in the unit its size calls for: 840, 416.5 thousand, 1.819 billion."""
    for unit, scale in (("billion", 1e9), ("million", 1e6), ("thousand", 1e3)):
        shown = f"{count / scale:.4g}"
        if float(shown) >= 1:  # 999,960 is 1 million, not 1000 thousand
            return f"{shown} {unit}"
    return f"{count:,}"


def _shape_str(shape: Any) -> str:
    if isinstance(shape, tuple) and all(isinstance(d, int) for d in shape):
        return "x".join(map(str, shape[1:]))  # drop the batch axis
    return ", ".join(_shape_str(s) for s in shape)
