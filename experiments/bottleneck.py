"""The 1x1 bottleneck: a cheap 1x1 convolution in front of a big one cuts its cost ~10x.

Claim (the course, after Szegedy et al. 2014): a 28x28x256 input convolved with 32 filters
of 5x5 ("same" padding) costs 28*28*32*5*5*256 = 160,563,200 multiply-adds; reducing the
input to 16 channels with a 1x1 convolution first costs 28*28*16*256 + 28*28*32*5*5*16 =
13,246,464, about a tenth, and the same output shape. This is what makes GoogLeNet's nine
Inception modules affordable.

Measured:
* the course's example as two real Flax modules (flaxcnn's `layers.Conv`, no bias): the
  multiply-adds and parameters counted by `flaxcnn.models.summary`, XLA's own cost
  analysis of the compiled functions (its "flops", with what it counts), and the median
  wall time of the jit-compiled forward pass after warm-up;
* for every Inception module of `googlenet` (3a ... 5b), at the input size and channel
  count it sees in the network at 224x224: the 3x3 and 5x5 branches and the whole module
  with their 1x1 reductions (the real `Inception` module) and without them (a direct
  3x3 / 5x5 convolution on all input channels), multiply-adds and parameters counted on
  real modules, cross-checked against `summary.layer_table` of the whole network and
  against the closed-form count; both the paper's 5x5 branch (`paper_5x5=True`) and
  torchvision's 3x3 one (the registry default);
* the forward time of each module, direct and bottlenecked, on the available device.

Sizes: --smoke: the counts (they do not depend on the size), XLA's cost analysis and a
tiny timing of the course example (batch 1); --quick: the counts, the course example
timed at batch 32 and every module at batch 8 on this machine's CPU; --full: the same with
batch 256 / 64 and more repeats, meant for a GPU or TPU.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import harness
import jax
import jax.numpy as jnp

from flaxcnn import models
from flaxcnn.models import inception, layers, summary

# The course's example: 28x28x256 in, 32 filters of 5x5, through a 16-channel 1x1.
SIZE, IN_CH, OUT_CH, KERNEL, REDUCED = 28, 256, 32, 5, 16
COURSE_DIRECT = 160_563_200  # the course's figures, checked against the measured counts
COURSE_BOTTLENECK = 13_246_464
IMAGE_SIZE = 224  # GoogLeNet's design input
VARIANTS = {"paper": True, "torchvision": False}  # name -> paper_5x5
SEED = 0
CONFIG_FIELDS = ("ch1x1", "ch3x3red", "ch3x3", "ch5x5red", "ch5x5", "pool_proj")


# --- the modules ------------------------------------------------------------------------


class DirectConv(nn.Module):
    """A k x k "same" convolution without bias: the expensive way."""

    features: int
    kernel: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # summary's functions pass it; there is nothing train-specific here
        pad = layers.torch_padding(self.kernel // 2)
        return layers.Conv(self.features, (self.kernel,) * 2, padding=pad, use_bias=False)(x)


class Bottlenecked(nn.Module):
    """A 1x1 reduction to `reduced` channels, then the same k x k convolution.

    No nonlinearity in between: the course counts multiply-adds only (in GoogLeNet a
    BatchNorm and a ReLU follow the 1x1, which cost no multiply-adds in this convention).
    """

    reduced: int
    features: int
    kernel: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = layers.Conv(self.reduced, (1, 1), use_bias=False, name="reduce")(x)
        return DirectConv(self.features, self.kernel, name="conv")(x, train)


class DirectInception(nn.Module):
    """An Inception module without the 1x1 reductions in front of the 3x3 and 5x5.

    Built from the same `basic_conv` (conv, BatchNorm, ReLU) as `inception.Inception`, with
    the same output channels, so the two differ only in the bottlenecks.
    """

    ch1x1: int
    ch3x3red: int
    ch3x3: int
    ch5x5red: int
    ch5x5: int
    pool_proj: int
    paper_5x5: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = inception.basic_conv(None, jnp.float32)
        k5 = 5 if self.paper_5x5 else 3
        branch1 = conv(self.ch1x1, 1, name="branch1")(x, train)
        branch2 = conv(self.ch3x3, 3, padding=1, name="branch2")(x, train)
        branch3 = conv(self.ch5x5, k5, padding=k5 // 2, name="branch3")(x, train)
        branch4 = layers.max_pool(x, 3, 1, padding=1, ceil_mode=True)
        branch4 = conv(self.pool_proj, 1, name="branch4_1")(branch4, train)
        return jnp.concatenate([branch1, branch2, branch3, branch4], axis=-1)


# --- closed-form counts --------------------------------------------------------------------


def conv_macs(h: int, w: int, cin: int, cout: int, k: int) -> int:
    """The course's count for a stride-1 "same" conv: every output x every kernel tap."""
    return h * w * cout * k * k * cin


def valid_taps(size: int, k: int) -> int:
    """Kernel taps, summed over one axis's outputs, that land inside the unpadded input.

    XLA's cost analysis counts a convolution's flops over these only: with "same" padding
    the taps on the zero border are not counted, so its flops fall short of 2 x the
    course's multiply-adds by the factor valid_taps(h) * valid_taps(w) / (h * w * k * k).
    """
    pad = k // 2
    return sum(min(i + pad, size - 1) - max(i - pad, 0) + 1 for i in range(size))


def xla_conv_flops(h: int, w: int, cin: int, cout: int, k: int) -> int:
    """2 x (multiply-adds over the valid taps only), as XLA counts a stride-1 "same" conv."""
    return 2 * valid_taps(h, k) * valid_taps(w, k) * cin * cout


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return a[0] + b[0], a[1] + b[1]


def branch_formula(h: int, w: int, cin: int, cfg: Sequence[int], k5: int) -> dict[str, int]:
    """Closed-form MACs and conv+BN parameters of an Inception module, both ways."""
    ch1, red3, ch3, red5, ch5, proj = cfg

    def conv(ci: int, co: int, k: int) -> tuple[int, int]:
        return conv_macs(h, w, ci, co, k), k * k * ci * co + 2 * co  # BN: scale and bias

    parts = {
        "b1": conv(cin, ch1, 1),
        "b3_bottleneck": _add(conv(cin, red3, 1), conv(red3, ch3, 3)),
        "b3_direct": conv(cin, ch3, 3),
        "b5_bottleneck": _add(conv(cin, red5, 1), conv(red5, ch5, k5)),
        "b5_direct": conv(cin, ch5, k5),
        "pool": conv(cin, proj, 1),
    }
    out = {f"{key}_macs": v[0] for key, v in parts.items()}
    out |= {f"{key}_params": v[1] for key, v in parts.items()}
    return out


# --- measuring -----------------------------------------------------------------------------


def counted(model: nn.Module, shape: Sequence[int]) -> tuple[int, int]:
    """Multiply-adds per image and trainable parameters, as flaxcnn's summary counts them."""
    return summary.total_macs(model, shape), summary.count_params(model, shape)


def branch_counts(model: nn.Module, shape: Sequence[int]) -> dict[str, tuple[int, int]]:
    """(MACs, params) of each top-level branch of a module, from `summary.layer_table`."""
    return {r.path: (r.macs, r.params) for r in summary.layer_table(model, shape, depth=1)}


def init_and_input(model: nn.Module, shape: Sequence[int]) -> tuple[Any, jax.Array]:
    """Random (seeded) variables and a random normal input of `shape`, drawn by one compiled
    program (op by op, each random draw of the initialiser is compiled on its own)."""
    from flaxcnn.training.state import compile_once

    def draw():
        kx, kp = jax.random.split(jax.random.key(SEED))
        x = jax.random.normal(kx, tuple(shape), jnp.float32)
        return model.init({"params": kp}, x, train=False), x

    return compile_once(draw)()


def compile_forward(model: nn.Module, shape: Sequence[int]) -> tuple[Any, Any, jax.Array]:
    """The jit-compiled eval-mode forward pass, with its (random, seeded) variables and input."""
    variables, x = init_and_input(model, shape)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return forward.lower(variables, x).compile(), variables, x


def xla_flops(compiled: Any) -> float | None:
    """XLA's own "flops" for a compiled computation (None where the backend gives none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    return float(cost["flops"]) if cost and "flops" in cost else None


def measure(
    nets: dict[str, nn.Module], shape: Sequence[int], repeats: int, warmup: int = 2
) -> dict[str, dict]:
    """Median wall time of each compiled forward pass (compile and warm-up excluded), and
    XLA's flops per image for it (a batch's flops are the batch size times an image's).

    The networks' calls are interleaved (A, B, A, B, ...), so that a busy machine slows
    both alike and their ratio stays meaningful.
    """
    compiled = {name: compile_forward(net, shape) for name, net in nets.items()}
    for _ in range(warmup):
        for fn, variables, x in compiled.values():
            jax.block_until_ready(fn(variables, x))
    times: dict[str, list[float]] = {name: [] for name in nets}
    for _ in range(repeats):
        for name, (fn, variables, x) in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(variables, x))
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, (fn, _, _) in compiled.items():
        flops = xla_flops(fn)
        out[name] = {
            "batch": shape[0],
            "repeats": repeats,
            "median_ms": 1e3 * statistics.median(times[name]),
            "min_ms": 1e3 * min(times[name]),
            "max_ms": 1e3 * max(times[name]),
            "xla_flops_per_image": None if flops is None else flops / shape[0],
        }
    return out


def course_example(batch: int, repeats: int) -> dict[str, Any]:
    """The 28x28x256 -> 32 x 5x5 example, direct and through the 16-channel 1x1."""
    shape = (1, SIZE, SIZE, IN_CH)
    nets = {
        "direct": DirectConv(OUT_CH, KERNEL),
        "bottleneck": Bottlenecked(REDUCED, OUT_CH, KERNEL),
    }
    formula = {
        "direct": conv_macs(SIZE, SIZE, IN_CH, OUT_CH, KERNEL),
        "bottleneck": conv_macs(SIZE, SIZE, IN_CH, REDUCED, 1)
        + conv_macs(SIZE, SIZE, REDUCED, OUT_CH, KERNEL),
    }
    xla_expected = {
        "direct": xla_conv_flops(SIZE, SIZE, IN_CH, OUT_CH, KERNEL),
        "bottleneck": xla_conv_flops(SIZE, SIZE, IN_CH, REDUCED, 1)
        + xla_conv_flops(SIZE, SIZE, REDUCED, OUT_CH, KERNEL),
    }
    out: dict[str, Any] = {}
    timings = measure(nets, (batch, SIZE, SIZE, IN_CH), repeats)
    for name, net in nets.items():
        macs, params = counted(net, shape)
        timing = timings[name]
        flops = timing["xla_flops_per_image"]
        out[name] = {
            "macs": macs,
            "formula_macs": formula[name],
            "params": params,
            "xla_flops": flops,
            "xla_flops_over_2macs": None if flops is None else flops / (2 * macs),
            "xla_flops_valid_taps_formula": xla_expected[name],
            "timing": timing,
        }
    d, b = out["direct"], out["bottleneck"]
    out["macs_ratio"] = d["macs"] / b["macs"]
    out["params_ratio"] = d["params"] / b["params"]
    out["speedup"] = d["timing"]["median_ms"] / b["timing"]["median_ms"]
    return out


def module_inputs(model: nn.Module) -> tuple[dict[str, tuple[int, int, int]], dict, tuple]:
    """Each Inception module's input (H, W, C) in the network, the network's own counts of
    each module (MACs, params), and of the whole network (its rows add up to it).

    An Inception module keeps the spatial size, and the max-pools between modules keep the
    channels, so a module's input is its own output's H x W with the previous layer's
    output channels; both are read off `summary.layer_table` of the whole network.
    """
    rows = summary.layer_table(model, (1, IMAGE_SIZE, IMAGE_SIZE, 3), depth=1)
    inputs, own = {}, {}
    for previous, row in itertools.pairwise(rows):
        if row.path in inception.INCEPTION_CONFIGS:
            _, h, w, _ = row.output_shape
            inputs[row.path] = (h, w, previous.output_shape[-1])
            own[row.path] = (row.macs, row.params)
    whole = (sum(r.macs for r in rows), sum(r.params for r in rows))
    return inputs, own, whole


def inception_modules(paper_5x5: bool) -> dict[str, Any]:
    """Direct vs bottlenecked counts for every module, cross-checked three ways."""
    network = models.create("googlenet", paper_5x5=paper_5x5)
    inputs, own, (whole_macs, whole_params) = module_inputs(network)
    k5 = 5 if paper_5x5 else 3
    modules = {}
    for name, (h, w, c) in inputs.items():
        cfg = inception.INCEPTION_CONFIGS[name]
        shape = (1, h, w, c)
        real = branch_counts(inception.Inception(*cfg, paper_5x5=paper_5x5), shape)
        direct = branch_counts(DirectInception(*cfg, paper_5x5=paper_5x5), shape)
        formula = branch_formula(h, w, c, cfg, k5)
        entry = {
            "input": [h, w, c],
            "config": dict(zip(CONFIG_FIELDS, cfg, strict=True)),
            "b3_bottleneck_macs": real["branch2_0"][0] + real["branch2_1"][0],
            "b3_bottleneck_params": real["branch2_0"][1] + real["branch2_1"][1],
            "b3_direct_macs": direct["branch2"][0],
            "b3_direct_params": direct["branch2"][1],
            "b5_bottleneck_macs": real["branch3_0"][0] + real["branch3_1"][0],
            "b5_bottleneck_params": real["branch3_0"][1] + real["branch3_1"][1],
            "b5_direct_macs": direct["branch3"][0],
            "b5_direct_params": direct["branch3"][1],
            "module_bottleneck_macs": sum(v[0] for v in real.values()),
            "module_bottleneck_params": sum(v[1] for v in real.values()),
            "module_direct_macs": sum(v[0] for v in direct.values()),
            "module_direct_params": sum(v[1] for v in direct.values()),
            "network_macs": own[name][0],  # googlenet's own layer_table row for the module
            "network_params": own[name][1],
        }
        expected = {
            k: v
            for k, v in formula.items()
            if k.startswith(("b3", "b5"))  # 1x1 and pool branches enter the module totals
        }
        totals = {
            "module_bottleneck_macs": formula["b1_macs"]
            + formula["b3_bottleneck_macs"]
            + formula["b5_bottleneck_macs"]
            + formula["pool_macs"],
            "module_direct_macs": formula["b1_macs"]
            + formula["b3_direct_macs"]
            + formula["b5_direct_macs"]
            + formula["pool_macs"],
            "module_bottleneck_params": formula["b1_params"]
            + formula["b3_bottleneck_params"]
            + formula["b5_bottleneck_params"]
            + formula["pool_params"],
            "module_direct_params": formula["b1_params"]
            + formula["b3_direct_params"]
            + formula["b5_direct_params"]
            + formula["pool_params"],
        }
        entry["formula_agrees"] = all(entry[k] == v for k, v in (expected | totals).items())
        entry["network_agrees"] = (
            entry["module_bottleneck_macs"] == entry["network_macs"]
            and entry["module_bottleneck_params"] == entry["network_params"]
        )
        modules[name] = entry
    saved_macs = sum(
        m["module_direct_macs"] - m["module_bottleneck_macs"] for m in modules.values()
    )
    saved_params = sum(
        m["module_direct_params"] - m["module_bottleneck_params"] for m in modules.values()
    )
    return {
        "paper_5x5": paper_5x5,
        "modules": modules,
        "network_macs": whole_macs,
        "network_params": whole_params,
        "network_without_reductions_macs": whole_macs + saved_macs,
        "network_without_reductions_params": whole_params + saved_params,
    }


def time_modules(result: dict[str, Any], batch: int, repeats: int) -> None:
    """Add the forward time of each module, direct and bottlenecked, and XLA's flops."""
    paper = result["paper_5x5"]
    for name, entry in result["modules"].items():
        h, w, c = entry["input"]
        cfg = inception.INCEPTION_CONFIGS[name]
        nets = {
            "direct": DirectInception(*cfg, paper_5x5=paper),
            "bottleneck": inception.Inception(*cfg, paper_5x5=paper),
        }
        timings = measure(nets, (batch, h, w, c), repeats)
        for kind in nets:
            entry[f"{kind}_timing"] = timing = timings[kind]
            flops = timing["xla_flops_per_image"]
            entry[f"{kind}_xla_flops"] = flops
            macs = entry[f"module_{kind}_macs"]
            entry[f"{kind}_xla_flops_over_2macs"] = None if flops is None else flops / (2 * macs)
        entry["speedup"] = (
            entry["direct_timing"]["median_ms"] / entry["bottleneck_timing"]["median_ms"]
        )


# --- the page ------------------------------------------------------------------------------


def millions(n: float) -> str:
    return f"{n / 1e6:,.2f}M"


def course_rows(course: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name, label in (("direct", "5x5 conv, 256 -> 32"), ("bottleneck", "1x1 to 16, then 5x5")):
        e = course[name]
        t = e["timing"]
        ratio = e["xla_flops_over_2macs"]
        rows.append(
            [
                label,
                f"{e['macs']:,}",
                f"{e['formula_macs']:,}",
                f"{e['params']:,}",
                harness.cell(e["xla_flops"], ",.0f"),
                harness.cell(ratio, ".4f"),
                f"{t['median_ms']:.2f}",
            ]
        )
    rows.append(
        [
            "direct / bottleneck",
            f"{course['macs_ratio']:.2f}x",
            "",
            f"{course['params_ratio']:.2f}x",
            harness.cell(
                _ratio(course["direct"]["xla_flops"], course["bottleneck"]["xla_flops"]), ".2f"
            )
            + "x",
            "",
            f"{course['speedup']:.2f}x",
        ]
    )
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def macs_rows(result: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name, m in result["modules"].items():
        h, w, c = m["input"]
        rows.append(
            [
                name.removeprefix("inception"),
                f"{h}x{w}x{c}",
                millions(m["b3_direct_macs"]),
                millions(m["b3_bottleneck_macs"]),
                millions(m["b5_direct_macs"]),
                millions(m["b5_bottleneck_macs"]),
                millions(m["module_direct_macs"]),
                millions(m["module_bottleneck_macs"]),
                f"{m['module_direct_macs'] / m['module_bottleneck_macs']:.2f}x",
                "yes" if m["network_agrees"] and m["formula_agrees"] else "NO",
            ]
        )
    return rows


def params_rows(result: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name, m in result["modules"].items():
        rows.append(
            [
                name.removeprefix("inception"),
                f"{m['b3_direct_params']:,}",
                f"{m['b3_bottleneck_params']:,}",
                f"{m['b5_direct_params']:,}",
                f"{m['b5_bottleneck_params']:,}",
                f"{m['module_direct_params']:,}",
                f"{m['module_bottleneck_params']:,}",
                f"{m['module_direct_params'] / m['module_bottleneck_params']:.2f}x",
            ]
        )
    return rows


def totals_rows(results: dict[str, dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for variant, r in results.items():
        ms = r["modules"].values()
        direct = sum(m["module_direct_macs"] for m in ms)
        bottle = sum(m["module_bottleneck_macs"] for m in ms)
        rows.append(
            [
                f"{variant} ({'5x5' if r['paper_5x5'] else '3x3'} in the '5x5' branch)",
                millions(direct),
                millions(bottle),
                f"{direct / bottle:.2f}x",
                f"{r['network_without_reductions_macs'] / 1e9:.3f}",
                f"{r['network_macs'] / 1e9:.3f}",
                millions(r["network_without_reductions_params"]),
                millions(r["network_params"]),
                "yes" if all(m["network_agrees"] and m["formula_agrees"] for m in ms) else "NO",
            ]
        )
    return rows


def timing_rows(result: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name, m in result["modules"].items():
        d, b = m.get("direct_timing"), m.get("bottleneck_timing")
        rows.append(
            [
                name.removeprefix("inception"),
                harness.cell(b and b["batch"]),
                harness.cell(d and d["median_ms"], ".1f"),
                harness.cell(b and b["median_ms"], ".1f"),
                harness.cell(m.get("speedup"), ".2f"),
                f"{m['module_direct_macs'] / m['module_bottleneck_macs']:.2f}",
                harness.cell(m.get("direct_xla_flops_over_2macs"), ".3f"),
                harness.cell(m.get("bottleneck_xla_flops_over_2macs"), ".3f"),
            ]
        )
    return rows


KINDS = (("direct", "tab:red"), ("bottleneck", "tab:blue"))
LABELS = {"direct": "direct (no 1x1 reduction)", "bottleneck": "1x1 reductions (as built)"}


def _bars(ax: Any, values: dict[str, list[float]], width: float = 0.4) -> None:
    """Side-by-side bars, direct (red) left of bottleneck (blue), one pair per module."""
    for i, (kind, colour) in enumerate(KINDS):
        xs = [x + (i - 0.5) * width for x in range(len(values[kind]))]
        ax.bar(xs, values[kind], width, label=LABELS[kind], color=colour)


def draw(result: dict[str, Any], timed: bool):
    """Bars per module: MACs, parameters and (when timed) forward time, direct vs bottleneck."""
    names = [n.removeprefix("inception") for n in result["modules"]]
    ms = list(result["modules"].values())
    panels = [
        ("multiply-adds per image (millions)", "module_{}_macs", 1e6),
        ("parameters (thousands)", "module_{}_params", 1e3),
    ]
    figure = harness.new_figure(15 if timed else 10.5, 4.4)
    axes = figure.subplots(1, 3 if timed else 2)
    xs = range(len(names))
    for ax, (label, key, scale) in zip(axes, panels, strict=False):
        _bars(ax, {kind: [m[key.format(kind)] / scale for m in ms] for kind, _ in KINDS})
        ax.set_ylabel(label)
    if timed:
        ax = axes[2]
        batch = ms[0]["bottleneck_timing"]["batch"]
        _bars(ax, {kind: [m[f"{kind}_timing"]["median_ms"] for m in ms] for kind, _ in KINDS})
        platform = jax.devices()[0].platform
        ax.set_ylabel(f"forward time, batch {batch}, {platform} (ms, median)")
    titles = ["Multiply-adds", "Parameters (conv + BatchNorm)", "Measured forward time"]
    for ax, title in zip(axes, titles, strict=False):
        ax.set_xticks(list(xs), names)
        ax.set_xlabel("Inception module")
        ax.set_title(title)
        ax.legend(title="3x3 and 5x5 branches", fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    figure.suptitle(
        "GoogLeNet's Inception modules at 224x224 (paper's 5x5 branch): without vs with "
        "the 1x1 reductions"
    )
    return figure


def verdict(course: dict[str, Any], paper: dict[str, Any]) -> str:
    d, b = course["direct"], course["bottleneck"]
    exact = d["macs"] == COURSE_DIRECT and b["macs"] == COURSE_BOTTLENECK
    ms = paper["modules"].values()
    direct = sum(m["module_direct_macs"] for m in ms)
    bottle = sum(m["module_bottleneck_macs"] for m in ms)
    agrees = all(m["network_agrees"] and m["formula_agrees"] for m in ms)
    return (
        f"**The claim held as counted{'' if exact else ' only in part'}.** The real Flax "
        f"modules count {d['macs']:,} multiply-adds directly and {b['macs']:,} through the "
        f"16-channel 1x1, {'exactly' if exact else 'NOT'} the course's figures "
        f"({course['macs_ratio']:.1f}x fewer; {course['params_ratio']:.1f}x fewer parameters). "
        f"Across GoogLeNet's nine modules (paper's 5x5) the 1x1 reductions cut the modules' "
        f"multiply-adds from {direct / 1e9:.2f} G to {bottle / 1e9:.2f} G per image "
        f"({direct / bottle:.1f}x) and the whole network from "
        f"{paper['network_without_reductions_macs'] / 1e9:.2f} to "
        f"{paper['network_macs'] / 1e9:.2f} GMACs; the counts "
        f"{'agree' if agrees else 'DO NOT agree'} with the network's own per-module counts "
        f"and with the closed form. {timing_sentence(course, paper)}"
    )


def timing_sentence(course: dict[str, Any], paper: dict[str, Any]) -> str:
    """What the measured times say, in words chosen by the numbers."""
    t = course["direct"]["timing"]
    platform = jax.devices()[0].platform
    speedup, ratio = course["speedup"], course["macs_ratio"]
    if speedup >= ratio:
        how = "at least in proportion to"
    elif speedup > 1:
        how = "less than in proportion to"
    else:
        how = "NOT (it was slower) in spite of"
    text = (
        f"In measured time the course example ran {speedup:.1f}x "
        f"{'faster' if speedup > 1 else 'slower'} bottlenecked (batch {t['batch']}, "
        f"{platform}), {how} its {ratio:.1f}x fewer multiply-adds."
    )
    ms = [m for m in paper["modules"].values() if "speedup" in m]
    if ms:
        lo, hi = min(m["speedup"] for m in ms), max(m["speedup"] for m in ms)
        below = sum(
            m["speedup"] < m["module_direct_macs"] / m["module_bottleneck_macs"] for m in ms
        )
        text += (
            f" The nine modules ran {lo:.1f}x to {hi:.1f}x as fast with their reductions as "
            f"without (batch {ms[0]['bottleneck_timing']['batch']}); {below} of 9 gained less "
            f"than their multiply-add ratio"
        )
        if below:
            text += (
                " (likely because the 1x1 convolutions, BatchNorm, ReLU, the max-pool and the "
                "concatenation cost time that the multiply-add count leaves out, and small "
                "convolutions use the hardware less well)"
            )
        text += "."
    return text


def xla_note(course: dict[str, Any]) -> str:
    d = course["direct"]
    if d["xla_flops"] is None:
        return "XLA gave no flop count on this backend."
    taps = valid_taps(SIZE, KERNEL)
    return (
        f"XLA's cost analysis counts 2 flops per multiply-add but only over the kernel taps "
        f"that fall inside the unpadded input: along a 28-pixel axis a 5-tap kernel with "
        f"padding 2 has {taps} valid taps out of {SIZE * KERNEL}, so XLA reports "
        f"2 x {taps}^2 x 256 x 32 = {d['xla_flops_valid_taps_formula']:,} flops for the direct "
        f"convolution (measured: {d['xla_flops']:,.0f}), {d['xla_flops_over_2macs']:.4f} of "
        f"2 x the course's count, which also multiplies the zero padding. The 1x1 has no "
        f"padding and comes out at exactly 2 flops per multiply-add. For the Inception "
        f"modules XLA's flops also include BatchNorm (folded to a scale and shift in eval "
        f"mode), ReLU and the max-pool, hence ratios slightly different from these."
    )


def main(argv: Sequence[str] | None = None) -> int:
    run = harness.start("bottleneck", __doc__, argv)
    course_batch = run.pick(smoke=1, quick=32, full=256)
    course_repeats = run.pick(smoke=3, quick=10, full=50)
    module_batch = run.pick(smoke=None, quick=8, full=64)
    module_repeats = run.pick(smoke=None, quick=7, full=30)

    print(f"course example: batch {course_batch}, {course_repeats} timed runs", flush=True)
    course = course_example(course_batch, course_repeats)
    results = {variant: inception_modules(paper) for variant, paper in VARIANTS.items()}
    paper = results["paper"]
    if module_batch is not None:
        print(f"timing the nine modules both ways, batch {module_batch}", flush=True)
        time_modules(paper, module_batch, module_repeats)
    timed = module_batch is not None

    page = harness.Page(
        run,
        "The 1x1 bottleneck",
        claim="A 1x1 convolution that first reduces 28x28x256 to 16 channels makes a 32-filter "
        "5x5 convolution about ten times cheaper: 13,246,464 instead of 160,563,200 "
        "multiply-adds for the same 28x28x32 output; GoogLeNet's Inception modules owe their "
        "affordability to such reductions in front of every 3x3 and 5x5.",
    )
    platform = jax.devices()[0].platform
    page.heading("The course's example")
    page.text(
        f'Both ways as Flax modules (flaxcnn\'s `layers.Conv`, no bias, "same" padding) on a '
        f"28x28x256 input; multiply-adds per image as `flaxcnn.models.summary` counts them, "
        f"XLA's flops from `jax.jit(...).lower(...).compile().cost_analysis()` of the timed "
        f"computation divided by its batch size (per image), and "
        f"the median of {course_repeats} jit-compiled forward passes at batch {course_batch} "
        f"on {platform} after compile and 2 warm-up calls, the "
        f"two ways' calls interleaved."
    )
    page.table(
        [
            "path",
            "MACs (counted)",
            "MACs (closed form)",
            "parameters",
            "XLA flops",
            "XLA flops / (2 x MACs)",
            f"median ms (batch {course_batch}, {platform})",
        ],
        course_rows(course),
    )
    page.text(xla_note(course))

    page.heading("Every Inception module of GoogLeNet, paper's 5x5 branch")
    page.text(
        "Input: the module's input in `googlenet` (`paper_5x5=True`) at 224x224. "
        '"direct": the 3x3 or 5x5 convolution applied to all the input channels; '
        '"bottleneck": the 1x1 reduction plus the convolution, as in the real `Inception` '
        "module. Module totals include the 1x1 and pool-projection branches, which are the "
        "same both ways. \"agrees\": the bottlenecked module's counts equal `googlenet`'s own "
        "`summary.layer_table` row for it and the closed form h*w*k*k*C_in*C_out, and the "
        "direct counts equal the closed form."
    )
    page.table(
        [
            "module",
            "input",
            "3x3 direct",
            "3x3 bottleneck",
            "5x5 direct",
            "5x5 bottleneck",
            "module direct",
            "module bottleneck",
            "direct / bottleneck",
            "agrees",
        ],
        macs_rows(paper),
    )
    page.text(
        "Parameters (convolution weights plus BatchNorm scale and bias, as the network counts "
        "them):"
    )
    page.table(
        [
            "module",
            "3x3 direct",
            "3x3 bottleneck",
            "5x5 direct",
            "5x5 bottleneck",
            "module direct",
            "module bottleneck",
            "direct / bottleneck",
        ],
        params_rows(paper),
    )
    page.heading("All nine modules, both layouts")
    page.text(
        'torchvision\'s GoogLeNet (the registry default) uses a 3x3 kernel in the "5x5" '
        "branch; `paper_5x5=True` restores the paper's 5x5. The whole network \"without "
        "reductions\" is the network's own count with every module replaced by its direct "
        "version (the module inputs do not change, since the outputs keep their channels)."
    )
    page.table(
        [
            "layout",
            "modules, direct",
            "modules, bottleneck",
            "ratio",
            "network GMACs without reductions",
            "network GMACs (as built)",
            "network params without reductions",
            "network params (as built)",
            "agrees",
        ],
        totals_rows(results),
    )
    page.heading("Measured forward time of each module")
    if timed:
        page.text(
            f"Paper layout, eval mode (BatchNorm with running statistics), jit-compiled, median "
            f"of {module_repeats} runs at batch {module_batch} on {platform} after compile and "
            f"2 warm-ups, direct and bottlenecked calls interleaved. XLA's flops per image over "
            f"2 x the counted MACs are shown for both versions."
        )
    else:
        page.text("Not timed at this size (run `--quick` or `--full`).")
    page.table(
        [
            "module",
            "batch",
            "direct ms",
            "bottleneck ms",
            "speed-up",
            "MAC ratio",
            "XLA/2MACs direct",
            "XLA/2MACs bottleneck",
        ],
        timing_rows(paper),
    )
    figure = draw(paper, timed)
    page.figure(
        harness.save_figure(figure, run.path(".png")),
        "Each Inception module of GoogLeNet (paper's 5x5 branch, 224x224 input) with its 3x3 "
        "and 5x5 convolutions applied directly to all input channels (red) and through the 1x1 "
        "reductions, as built (blue): multiply-adds, parameters"
        + (f" and measured forward time (batch {module_batch}, {platform})" if timed else "")
        + ".",
    )
    page.heading("Verdict")
    page.text(verdict(course, paper))
    page.heading("Full size")
    if run.full:
        page.text("This page is the full run.")
    else:
        page.text(
            "The full setting times the course example at batch 256 (50 runs) and every module "
            "at batch 64 (30 runs), meant for a GPU or TPU:\n\n"
            "```bash\npython experiments/bottleneck.py --full\n```\n\n"
            "The counts do not depend on the size. It has not been run for this page, so its "
            "timing cells are empty:"
        )
        page.table(
            ["what", "batch", "direct ms", "bottleneck ms", "speed-up"],
            [["course example", 256, None, None, None]]
            + [[n.removeprefix("inception"), 64, None, None, None] for n in paper["modules"]],
        )
    page.write(
        data={
            "course": course,
            "course_figures": {"direct": COURSE_DIRECT, "bottleneck": COURSE_BOTTLENECK},
            "googlenet": results,
            "timing": {
                "platform": platform,
                "course_batch": course_batch,
                "course_repeats": course_repeats,
                "module_batch": module_batch,
                "module_repeats": module_repeats,
            },
        }
    )
    return 0


if __name__ == "__main__":
    harness.main_guard(main)
