"""The classification loss: log-softmax + NLL on integer labels is softmax + cross-entropy.

The course's claim: the loss of one example is -log p(true class), where p = softmax(logits);
computing it as log-softmax followed by the negative log-likelihood of the integer label
(what `flaxcnn.losses.cross_entropy` and `flaxcnn.losses.nll_loss` do) is the same as
softmax followed by the cross-entropy against a one-hot target, -sum(onehot * log(softmax)),
in value and in gradient (softmax - onehot), but numerically safe; and -log p is 0 when
p -> 1 and grows without bound as p -> 0.

Measured, on seeded random logits (standard normal times a scale, from 0.1 to 1000) and
random integer labels, in float32 and float64 (jax's x64 mode, switched on at the start of
this script):

* per-example loss and the gradient of the mean loss with respect to the logits
  (`jax.grad`) of five computations: `flaxcnn.losses.cross_entropy(z, y)`,
  `flaxcnn.losses.nll_loss(jax.nn.log_softmax(z), y)`, `optax.softmax_cross_entropy(z,
  onehot)`, -sum(onehot * log(jax.nn.softmax(z))) written out here, and the textbook
  -sum(onehot * log(exp(z) / sum(exp(z)))) with no max-subtraction; plus the analytic
  gradient softmax - onehot; each against a NumPy reference computed from the same
  logits in a wider type (float64 for float32, long double for float64): max abs
  differences;
* how many entries of log(softmax(z)) and of log_softmax(z) are inf/nan at each scale;
* -log p through `flaxcnn.losses.nll_loss` at p = 1, 0.5, 0.1, 0.01, 1e-6, and its curve.

Sizes: --smoke 256 examples x 10 classes; --quick 10,000 examples x 1,000 classes; --full
is the same as --quick (the claim is about arithmetic, a bigger batch adds nothing; the
full command exists for uniformity and writes loss-full.*).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxcnn import losses

SEED = 0
SCALES = (0.1, 1.0, 10.0, 30.0, 100.0, 1000.0)
DTYPES = ("float32", "float64")
PROBABILITIES = (1.0, 0.5, 0.1, 0.01, 1e-6)

# --- the five computations of the same loss (per example) ---------------------------------


def flax_cross_entropy(z: jax.Array, y: jax.Array, onehot: jax.Array) -> jax.Array:
    """flaxcnn.losses.cross_entropy (a mean) applied to each example on its own."""
    return jax.vmap(lambda zi, yi: losses.cross_entropy(zi[None], yi[None]))(z, y)


def flax_nll(z: jax.Array, y: jax.Array, onehot: jax.Array) -> jax.Array:
    """flaxcnn.losses.nll_loss of jax.nn.log_softmax, each example on its own."""
    log_probs = jax.nn.log_softmax(z, axis=-1)
    return jax.vmap(lambda lp, yi: losses.nll_loss(lp[None], yi[None]))(log_probs, y)


def optax_one_hot(z: jax.Array, y: jax.Array, onehot: jax.Array) -> jax.Array:
    """optax's softmax cross-entropy against the one-hot target (a third reference)."""
    return optax.softmax_cross_entropy(z, onehot)


def one_hot_log_softmax_of(z: jax.Array, y: jax.Array, onehot: jax.Array) -> jax.Array:
    """-sum(onehot * log(softmax(z))): softmax first (jax's, max-subtracted), then log."""
    return -jnp.sum(onehot * jnp.log(jax.nn.softmax(z, axis=-1)), axis=-1)


def one_hot_textbook(z: jax.Array, y: jax.Array, onehot: jax.Array) -> jax.Array:
    """-sum(onehot * log(exp(z) / sum(exp(z)))): the formula as written, no max-subtraction."""
    e = jnp.exp(z)
    return -jnp.sum(onehot * jnp.log(e / jnp.sum(e, axis=-1, keepdims=True)), axis=-1)


METHODS: dict[str, tuple[str, Callable[..., jax.Array]]] = {
    "cross_entropy": ("flaxcnn.losses.cross_entropy(z, y)", flax_cross_entropy),
    "nll_loss": ("flaxcnn.losses.nll_loss(log_softmax(z), y)", flax_nll),
    "optax": ("optax.softmax_cross_entropy(z, onehot)", optax_one_hot),
    "log_of_softmax": ("-sum(onehot * log(softmax(z)))", one_hot_log_softmax_of),
    "textbook": ("-sum(onehot * log(exp(z) / sum exp(z)))", one_hot_textbook),
}
STABLE = ("cross_entropy", "nll_loss", "optax")


# --- the reference and the data -----------------------------------------------------------


def reference(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-example loss and gradient (softmax - onehot), well beyond the logits' precision.

    float64 for float32 logits (29 more bits), long double (x87 80-bit, 11 more bits where
    the platform has it) for float64 logits.
    """
    z = z.astype(np.float64 if z.dtype == np.float32 else np.longdouble)
    shifted = z - z.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    rows = np.arange(len(y))
    grad = np.exp(log_probs)
    grad[rows, y] -= 1
    return -log_probs[rows, y], grad


def batch(examples: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Standard normal logits (float64, scaled later) and integer labels, seeded."""
    rng = np.random.default_rng(SEED)
    return rng.standard_normal((examples, classes)), rng.integers(0, classes, examples)


def compare(
    base: np.ndarray, labels: np.ndarray, scale: float, dtype: str
) -> dict[str, dict[str, Any]]:
    """Every computation at one scale and dtype, against the wider-precision reference."""
    z_np = (scale * base).astype(dtype)
    true_loss, true_grad = reference(z_np, labels)
    n = len(labels)
    z = jnp.asarray(z_np)
    y = jnp.asarray(labels, dtype=jnp.int32)
    onehot = jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype)
    out: dict[str, dict[str, Any]] = {}
    size = np.maximum(1.0, np.abs(z_np).max(axis=-1))  # each example's largest |logit|
    for key in METHODS:
        per_example, grad = per_example_and_grad(key, z, y, onehot)
        out[key] = differences(per_example, n * grad, true_loss, true_grad, size)
    analytic = np.asarray(jax.nn.softmax(z, axis=-1) - onehot)
    out["analytic"] = differences(None, analytic, true_loss, true_grad, size)
    out["reference"] = {"mean_loss": float(true_loss.mean())}
    counts = {k: v.item() for k, v in non_finite_log_probs(z).items()}
    out["overflow"] = {"entries": int(z.size), **counts}
    return out


@functools.cache
def compiled(key: str) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """One method's per-example loss and the gradient of its mean, in one jitted program
    (one compile per dtype, not two)."""
    fn = METHODS[key][1]

    def value_and_grad(z: jax.Array, y: jax.Array, onehot: jax.Array):
        grad = jax.grad(lambda z: jnp.mean(fn(z, y, onehot)))(z)
        return fn(z, y, onehot), grad

    return jax.jit(value_and_grad)


def per_example_and_grad(
    key: str, z: jax.Array, y: jax.Array, onehot: jax.Array
) -> tuple[np.ndarray, np.ndarray]:
    """The per-example losses and jax.grad of their mean with respect to the logits."""
    value, grad = compiled(key)(z, y, onehot)
    return np.asarray(value), np.asarray(grad)


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    """Max |a - b|; inf or nan when `a` has them (a broken computation must show)."""
    diff = np.abs(a.astype(b.dtype) - b)
    if not np.all(np.isfinite(diff)):
        return float("nan") if np.any(np.isnan(diff)) else float("inf")
    return float(diff.max())


def differences(
    per_example: np.ndarray | None,
    grad_per_example: np.ndarray,
    true_loss: np.ndarray,
    true_grad: np.ndarray,
    size: np.ndarray,
) -> dict[str, Any]:
    """Value and gradient differences, and how many results were not finite."""
    out: dict[str, Any] = {
        # N * dL/dz of the mean loss: the per-example gradient, entries in [-1, 1].
        "grad_max_abs": max_abs(grad_per_example, true_grad),
        "grad_non_finite": int(np.sum(~np.isfinite(grad_per_example))),
    }
    if per_example is not None:
        out["value_max_abs"] = max_abs(per_example, true_loss)
        # Relative to the example's largest |logit|: rounding the logits moves the loss by
        # about eps * |logit|, so this is the scale of an honest rounding error.
        out["value_max_rel"] = max_abs(per_example / size, true_loss / size)
        out["mean_loss"] = float(np.mean(per_example))
        out["mean_loss_abs"] = abs(float(np.mean(per_example)) - float(true_loss.mean()))
        out["loss_non_finite"] = int(np.sum(~np.isfinite(per_example)))
    return out


@jax.jit
def non_finite_log_probs(z: jax.Array) -> dict[str, Any]:
    """Entries of each log-probability computation that are inf or nan."""
    stable = jax.nn.log_softmax(z, axis=-1)
    of_softmax = jnp.log(jax.nn.softmax(z, axis=-1))
    e = jnp.exp(z)
    textbook = jnp.log(e / jnp.sum(e, axis=-1, keepdims=True))
    return {
        "log_softmax": jnp.sum(~jnp.isfinite(stable)),
        "log_of_softmax": jnp.sum(~jnp.isfinite(of_softmax)),
        "textbook": jnp.sum(~jnp.isfinite(textbook)),
        "log_softmax_min": jnp.min(stable),
        "exp_overflow": jnp.sum(jnp.isinf(e)),
    }


# --- -log p -------------------------------------------------------------------------------


def neg_log_p(p: float, dtype: str) -> float:
    """-log p as the NLL of a two-class example whose true class has probability p."""
    log_probs = jnp.log(jnp.asarray([[p, 1.0 - p]], dtype=dtype))
    return float(losses.nll_loss(log_probs, jnp.asarray([0]))) + 0.0  # -0.0 -> 0.0


# --- the page -----------------------------------------------------------------------------


def number(value: float | None, fmt: str = ".1e") -> str:
    """A cell: the value, or 'nan'/'inf' spelled out when the computation broke."""
    if value is None:
        return harness.NOT_RUN
    if math.isnan(value):
        return "**nan**"
    if math.isinf(value):
        return "**inf**"
    return format(value, fmt)


def value_rows(results: dict[str, dict[float, dict]]) -> list[list[str]]:
    return [
        [dtype, f"{scale:g}", number(r["reference"]["mean_loss"], ".4g")]
        + [number(r[key]["value_max_abs"]) for key in METHODS]
        for dtype, by_scale in results.items()
        for scale, r in by_scale.items()
    ]


def grad_rows(results: dict[str, dict[float, dict]]) -> list[list[str]]:
    return [
        [dtype, f"{scale:g}"] + [number(r[key]["grad_max_abs"]) for key in (*METHODS, "analytic")]
        for dtype, by_scale in results.items()
        for scale, r in by_scale.items()
    ]


def overflow_rows(results: dict[str, dict[float, dict]]) -> list[list[str]]:
    rows = []
    for dtype, by_scale in results.items():
        for scale, r in by_scale.items():
            o = r["overflow"]
            share = {k: count_share(o[k], o["entries"]) for k in METHODS_LOG}
            rows.append(
                [
                    dtype,
                    f"{scale:g}",
                    share["log_softmax"],
                    f"{o['log_softmax_min']:.4g}",
                    share["log_of_softmax"],
                    share["textbook"],
                    f"{r['log_of_softmax']['loss_non_finite']:,}",
                    f"{r['textbook']['loss_non_finite']:,}",
                ]
            )
    return rows


METHODS_LOG = ("log_softmax", "log_of_softmax", "textbook")


def count_share(count: int, total: int) -> str:
    """'0', or the count and its share: a handful of broken entries must not read as 0%."""
    return "0" if count == 0 else f"{count:,} ({100 * count / total:.3g}%)"


def draw_curve(table: list[dict], path: Path) -> Path:
    """-log p on a linear and on a log p axis, with the tabulated points marked."""
    figure = harness.new_figure(10, 4)
    for i, log_axis in enumerate((False, True)):
        ax = figure.add_subplot(1, 2, i + 1)
        p = np.logspace(-8, 0, 400) if log_axis else np.linspace(1e-3, 1, 400)
        ax.plot(p, -np.log(p), color="tab:blue", label="-log p")
        for row in table:
            if log_axis or row["p"] >= 1e-3:
                ax.plot(row["p"], row["float32"], "o", color="tab:red")
                ax.annotate(
                    f"p={row['p']:g}: {row['float32']:.3g}",
                    (row["p"], row["float32"]),
                    textcoords="offset points",
                    xytext=(6, -12) if row["p"] == 1.0 else (6, 4),
                    fontsize=8,
                )
        ax.plot([], [], "o", color="tab:red", label="flaxcnn.losses.nll_loss (float32)")
        ax.set_xlabel("p = probability the network gives the true class" + (" (log)" * log_axis))
        ax.set_ylabel("loss of the example, -log p (nats)")
        if log_axis:
            ax.set_xscale("log")
        ax.set_title("log p axis: grows without bound" if log_axis else "linear p axis")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return harness.save_figure(figure, path)


STYLES = {"float32": "-", "float64": "--"}


def style_legend(ax: Any, entries: list[tuple[str, str, str]]) -> None:
    """Colour and marker = the computation; line style = the dtype (two separate keys)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker=m, label=label) for label, c, m in entries]
    handles += [Line2D([], [], color="grey", linestyle=s, label=d) for d, s in STYLES.items()]
    ax.legend(handles=handles, fontsize=7)


def draw_agreement(results: dict[str, dict[float, dict]], path: Path) -> Path:
    """Gradient error against scale (stable methods), and the broken log-probabilities."""
    from matplotlib import ticker

    figure = harness.new_figure(11, 4.4)
    ax = figure.add_subplot(1, 2, 1)
    left = [
        (METHODS["cross_entropy"][0], "tab:blue", "o"),
        (METHODS["nll_loss"][0], "tab:orange", "s"),
        (METHODS["optax"][0], "tab:green", "x"),
        ("softmax(z) - onehot", "tab:purple", "+"),
    ]
    for dtype, by_scale in results.items():
        for key, (_, colour, marker) in zip((*STABLE, "analytic"), left, strict=True):
            errors = [max(r[key]["grad_max_abs"], 1e-20) for r in by_scale.values()]
            ax.plot(list(by_scale), errors, STYLES[dtype], marker=marker, color=colour)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("logit scale (standard deviation of the logits)")
    ax.set_ylabel("max |gradient - reference|\n(per-example gradient, entries in [-1, 1])")
    ax.set_title("log-softmax computations: rounding only")
    style_legend(ax, left)
    ax.grid(alpha=0.3)
    ax = figure.add_subplot(1, 2, 2)
    right = [
        ("log_softmax(z)", "tab:blue", "o"),
        ("log(softmax(z))", "tab:red", "s"),
        ("log(exp(z) / sum exp(z))", "black", "x"),
    ]
    entries = 1
    for dtype, by_scale in results.items():
        for key, (_, colour, marker) in zip(METHODS_LOG, right, strict=True):
            share = [100 * r["overflow"][key] / r["overflow"]["entries"] for r in by_scale.values()]
            ax.plot(list(by_scale), share, STYLES[dtype], marker=marker, color=colour)
            entries = max([entries, *(r["overflow"]["entries"] for r in by_scale.values())])
    ax.set_xscale("log")
    # Log-scaled, so that a handful of broken entries (float32's first break: 6 of 10 million
    # at scale 10) stands as far above 0 as it is from 100%; linear below one entry's share,
    # which puts 0 at the bottom.
    one = 100 / entries
    ax.set_yscale("symlog", linthresh=one, linscale=0.5)
    ax.set_ylim(-one / 2, 200)  # the markers at 0 whole
    ax.yaxis.set_major_locator(ticker.SymmetricalLogLocator(linthresh=one, base=10))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("logit scale (standard deviation of the logits)")
    ax.set_ylabel("log-probabilities that are inf or nan, %\n(log scale; 0 at the bottom)")
    ax.set_title("log of softmax breaks, log_softmax does not")
    style_legend(ax, right)
    ax.grid(alpha=0.3)
    return harness.save_figure(figure, path)


def main(argv: Sequence[str] | None = None) -> None:
    jax.config.update("jax_enable_x64", True)  # float64 alongside float32, this process only
    run = harness.start("loss", __doc__, argv)
    examples, classes = run.pick(smoke=(256, 10), quick=(10_000, 1_000), full=(10_000, 1_000))
    base, labels = batch(examples, classes)
    results = {
        dtype: {scale: compare(base, labels, scale, dtype) for scale in SCALES} for dtype in DTYPES
    }
    curve = [
        {"p": p, "exact": -math.log(p) + 0.0, **{d: neg_log_p(p, d) for d in DTYPES}}
        for p in PROBABILITIES
    ]

    page = harness.Page(
        run,
        "Log-softmax + NLL on integer labels is softmax + cross-entropy on one-hot labels",
        claim="The classification loss of an example is -log p(true class): log-softmax "
        "followed by the negative log-likelihood of the integer label equals softmax followed "
        "by the cross-entropy against the one-hot target, in value and gradient "
        "(softmax - onehot), and is the numerically safe way to compute it; -log p is 0 as "
        "p -> 1 and grows without bound as p -> 0.",
    )
    page.text(
        f"{examples:,} examples x {classes:,} classes; logits = scale x standard normal "
        f"(seed {SEED}), rounded to the dtype; random integer labels. Every difference is "
        "against a NumPy computation from the same rounded logits in a wider type: float64 "
        f"for float32 logits, long double ({np.finfo(np.longdouble).nmant + 1}-bit "
        "significand on this machine) for float64 logits. `flaxcnn.losses.cross_entropy` "
        "casts the logits to float32 before its log-softmax (by design), so in the float64 "
        "rows it carries float32 rounding: rounding a logit z to float32 moves it by up to "
        "eps32 x |z|, which at large scales moves the loss and the probabilities visibly."
        + (" --full is the same size as --quick." if run.full else "")
    )
    page.heading("The value")
    page.text(
        "Max abs difference of the per-example loss from the reference (the library's mean "
        "losses applied to one example at a time with `jax.vmap`); nan/inf: the computation "
        "broke. The differences grow with the scale because the loss itself does: rounding "
        "the logits moves it by about eps x |logit|."
    )
    names = [label for label, _ in METHODS.values()]
    page.table(["dtype", "logit scale", "mean loss (reference)", *names], value_rows(results))
    page.heading("The gradient")
    page.text(
        "Max abs difference of N x jax.grad of the mean loss (the per-example gradient "
        "softmax - onehot, entries in [-1, 1]) from the reference; the last column is the "
        "analytic gradient softmax(z) - onehot computed in the dtype."
    )
    page.table(["dtype", "logit scale", *names, "softmax(z) - onehot"], grad_rows(results))
    page.figure(
        draw_agreement(results, run.path(".png")),
        "Left: gradient error of the stable computations against the logit scale (float32 "
        "solid, float64 dashed). Right: the share of log-probabilities that are inf/nan (log "
        "scale, 0 at the bottom, so that a few broken entries show); "
        "log_softmax(z) never breaks, log(softmax(z)) breaks once probabilities underflow to "
        "0, the unshifted exp once exp(z) overflows.",
    )
    page.heading("Large logits: log(softmax) breaks, log_softmax does not")
    page.text(
        "exp(x) overflows to inf above x = 88.7 in float32 (709.8 in float64) and underflows "
        "to 0 below about -87.3 in float32 (XLA on CPU flushes subnormal results to zero by "
        "default, `--xla_cpu_ftz`) and about -708 in float64 (the same flush): a probability "
        "that underflows makes log(softmax) -inf, and onehot x -inf = nan for the other "
        "classes. log_softmax(z) = "
        "z - max(z) - log(sum exp(z - max(z))) never takes the log of an underflowed number."
    )
    page.table(
        [
            "dtype",
            "logit scale",
            "log_softmax(z) inf/nan",
            "smallest log_softmax(z)",
            "log(softmax(z)) inf/nan",
            "log(exp(z) / sum exp(z)) inf/nan",
            "examples with inf/nan loss, -sum(onehot * log(softmax))",
            "examples with inf/nan loss, unshifted exp",
        ],
        overflow_rows(results),
    )
    page.heading("-log p")
    page.table(
        ["p", "-log p, nll_loss float32", "-log p, nll_loss float64", "exact (math.log)"],
        [
            [f"{r['p']:g}", f"{r['float32']:.6g}", f"{r['float64']:.10g}", f"{r['exact']:.10g}"]
            for r in curve
        ],
    )
    page.figure(
        draw_curve(curve, run.path("-neglogp.png")),
        "The loss of one example, -log p, against the probability p given to its true class: "
        "0 at p = 1, and without bound as p -> 0 (right: log p axis). Points: "
        "flaxcnn.losses.nll_loss on a two-class example.",
    )
    page.heading("Did the claim hold?")
    page.text(verdict(results, curve))
    if not run.full:
        page.heading("Full setting")
        page.text(
            "`python experiments/loss.py --full` runs the same size as --quick (10,000 x "
            "1,000) and writes loss-full.*; it was not run, so its cells are empty:"
        )
        page.table(
            ["dtype", "logit scale", "mean loss (reference)", *names],
            [[d, f"{s:g}", *[harness.NOT_RUN] * (1 + len(names))] for d in DTYPES for s in SCALES],
        )
    page.write(
        data={
            "examples": examples,
            "classes": classes,
            "scales": list(SCALES),
            "results": {d: {f"{s:g}": r for s, r in by.items()} for d, by in results.items()},
            "neg_log_p": curve,
        }
    )


EPS = {"float32": float(np.finfo(np.float32).eps), "float64": float(np.finfo(np.float64).eps)}


def tolerance(dtype: str, key: str) -> float:
    """What counts as rounding: 1,000 eps of the dtype the computation really runs in."""
    # cross_entropy casts the logits to float32 (by design), so float64 is float32 there.
    inner = "float32" if key == "cross_entropy" else dtype
    return 1000 * EPS[inner]


def verdict(results: dict[str, dict[float, dict]], curve: list[dict]) -> str:
    """Plain sentences built from the measured numbers, and whether the claim held."""
    parts, held = [], True
    for dtype, by_scale in results.items():
        worst = {
            key: max(
                max(by_scale[s][key]["value_max_rel"], by_scale[s][key]["grad_max_abs"])
                for s in by_scale
            )
            for key in STABLE
        }
        finite = all(
            by_scale[s][k]["loss_non_finite"] == 0 and by_scale[s][k]["grad_non_finite"] == 0
            for s in by_scale
            for k in STABLE
        )
        within = all(worst[k] <= tolerance(dtype, k) for k in STABLE)
        broken = [
            f"{s:g}" for s in by_scale if by_scale[s]["log_of_softmax"]["loss_non_finite"] > 0
        ]
        never = all(by_scale[s]["overflow"]["log_softmax"] == 0 for s in by_scale)
        naive = [
            max(by_scale[s][k]["value_max_rel"], by_scale[s][k]["grad_max_abs"])
            for s in by_scale
            for k in ("log_of_softmax", "textbook")
            if by_scale[s][k]["loss_non_finite"] == 0 and by_scale[s][k]["grad_non_finite"] == 0
        ]
        naive_within = max(naive, default=0.0) <= tolerance(dtype, "textbook")
        held &= finite and never and within and naive_within and bool(broken)
        parts.append(
            f"In {dtype}, at every scale, the worst difference from the reference (loss "
            "relative to the largest |logit|, or per-example gradient) was "
            f"{worst['cross_entropy']:.1e} for flaxcnn's cross_entropy, "
            f"{worst['nll_loss']:.1e} for nll_loss(log_softmax) on integer labels and "
            f"{worst['optax']:.1e} for optax on one-hot labels ("
            + ("all within" if within else "NOT all within")
            + " 1,000 eps of the dtype they compute in"
            + (", float32 for cross_entropy" if dtype == "float64" else "")
            + "), with "
            + ("no" if finite else "SOME")
            + " inf/nan. The one-hot forms written with log(softmax(z)) agreed to "
            + f"{max(naive, default=float('nan')):.1e} where they were finite"
            + ("" if naive_within else " (NOT within 1,000 eps)")
            + "; log_softmax(z) was "
            + ("never" if never else "SOMETIMES")
            + " inf/nan, while -sum(onehot * log(softmax(z))) gave inf/nan at logit scale "
            + (", ".join(broken) if broken else "none of those tried")
            + "."
        )
    exact = all(math.isclose(r["float64"], r["exact"], abs_tol=1e-12) for r in curve)
    held &= exact and curve[0]["float32"] == 0.0
    parts.append(
        f"-log p was {curve[0]['float32']:g} at p = 1 and "
        + ", ".join(f"{r['float32']:.4g} at p = {r['p']:g}" for r in curve[1:])
        + " (float32; float64 "
        + ("equal to" if exact else "DIFFERENT FROM")
        + " math.log): it grows without bound as p -> 0."
    )
    parts.append(
        "The claim held as measured: the same value and gradient up to rounding wherever the "
        "one-hot softmax form is finite, and only the log-softmax form stays finite for large "
        "logits."
        if held
        else "The claim did NOT hold as measured (see the numbers above)."
    )
    return " ".join(parts)


if __name__ == "__main__":
    harness.main_guard(main)
