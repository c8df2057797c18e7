"""1x1 convolutions: a per-pixel matrix product that mixes and re-counts channels.

Claim (the course): a 1x1 convolution with C_in input and C_out output channels looks at
one pixel at a time; at each pixel it multiplies the C_in-vector of channel values by a
C_in x C_out matrix and adds a bias, so it mixes the channels and changes their number
(C_in*C_out + C_out parameters) while leaving the spatial size alone. It is exactly a
fully connected (Dense) layer applied to every pixel.

Measured, on a real photograph (scikit-learn's bundled sample image "china.jpg", centre
crop, resized) turned into C_in feature maps by a fixed, seeded 3x3 convolution + ReLU (the
first layer of a CNN at initialisation), with one `flax.linen.Conv((1, 1))` (seeded kernel
and a non-zero bias):
* the 1x1 convolution's output against `jnp.einsum("nhwc,cd->nhwd")` with the same kernel,
  against an explicit (N*H*W, C_in) @ (C_in, C_out) matrix product, and against a
  `flax.linen.Dense` holding the same kernel applied to every pixel's vector (`jax.vmap`
  over the pixels): max absolute and max relative difference, in float32;
* each float32 result against a float64 NumPy reference from the same float32 values, and
  the worst-case float32 rounding bound for a dot product of length C_in;
* the same comparisons in float64 (jax's x64 mode switched on in-process with
  `jax.enable_x64`, no subprocess);
* whether XLA compiles the 1x1 convolution as a convolution or as a dot.

Sizes: --smoke: a 32x32 crop, 8 -> 4 channels; --quick: 224x224, 64 -> 32 channels (a
realistic layer size); --full: identical to --quick (the claim is exact arithmetic, so a
larger size adds nothing; the full command exists for uniformity and writes
one_by_one-full.*).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import harness
import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_sample_image

from flaxcnn.models import layers

IMAGE = "china.jpg"  # ships inside scikit-learn: a real photograph, no download
SEED = 0
EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)


# --- the input -----------------------------------------------------------------------------


def photo(size: int) -> np.ndarray:
    """The sample photograph, centre-cropped to a square and resized to size x size, in [0, 1]."""
    image = load_sample_image(IMAGE).astype(np.float32) / 255.0
    h, w, _ = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top : top + side, left : left + side]
    resized = jax.image.resize(jnp.asarray(square), (size, size, 3), "linear", antialias=True)
    return np.clip(np.asarray(resized), 0.0, 1.0)


def feature_maps(image: np.ndarray, channels: int) -> np.ndarray:
    """C_in feature maps from the RGB image: a seeded 3x3 conv + ReLU (a first CNN layer).

    Unpadded, so no zero-padding edge dominates the maps: the output is 2 pixels smaller.
    """
    stem = layers.Conv(channels, (3, 3), padding=layers.torch_padding(0))
    x = jnp.asarray(image)[None]
    params = initialise(stem, SEED, x.shape)
    return np.asarray(jax.nn.relu(stem.apply(params, x)))


def initialise(module: nn.Module, seed: int, shape: tuple[int, ...]) -> dict:
    """`module.init` for inputs of `shape`, as one compiled program (op by op, each random
    draw of the initialiser is compiled on its own)."""
    from flaxcnn.training.state import compile_once

    return compile_once(lambda: module.init(jax.random.key(seed), jnp.zeros(shape)))()


# --- the four ways of computing the same thing ----------------------------------------------


def one_by_one(features: int, dtype: Any = jnp.float32) -> nn.Conv:
    """The 1x1 convolution under test, with a non-zero bias so that the bias path counts."""
    return nn.Conv(
        features,
        (1, 1),
        use_bias=True,
        dtype=dtype,
        param_dtype=dtype,
        bias_init=nn.initializers.normal(0.1),
    )


def conv_apply(params: dict, x: jax.Array) -> jax.Array:
    """The 1x1 convolution (flax.linen.Conv) itself."""
    kernel = params["params"]["kernel"]
    return one_by_one(kernel.shape[-1], kernel.dtype).apply(params, x)


def einsum_apply(params: dict, x: jax.Array) -> jax.Array:
    """Per-pixel matrix product written as an einsum over the channel axis, plus the bias."""
    kernel, bias = params["params"]["kernel"], params["params"]["bias"]
    return jnp.einsum("nhwc,cd->nhwd", x, kernel[0, 0]) + bias


def matmul_apply(params: dict, x: jax.Array) -> jax.Array:
    """The pixels as rows of an (N*H*W, C_in) matrix, times the (C_in, C_out) kernel."""
    kernel, bias = params["params"]["kernel"], params["params"]["bias"]
    n, h, w, c = x.shape
    return (x.reshape(n * h * w, c) @ kernel[0, 0] + bias).reshape(n, h, w, -1)


def dense_per_pixel_apply(params: dict, x: jax.Array) -> jax.Array:
    """A Dense layer holding the same kernel, applied to one pixel's vector, vmapped."""
    kernel, bias = params["params"]["kernel"], params["params"]["bias"]
    dense = nn.Dense(kernel.shape[-1], dtype=kernel.dtype, param_dtype=kernel.dtype)
    dense_params = {"params": {"kernel": kernel[0, 0], "bias": bias}}
    n, h, w, c = x.shape
    pixels = x.reshape(n * h * w, c)
    out = jax.vmap(lambda pixel: dense.apply(dense_params, pixel))(pixels)
    return out.reshape(n, h, w, -1)


FORMS = {
    "einsum": einsum_apply,
    "matmul": matmul_apply,
    "Dense per pixel": dense_per_pixel_apply,
}


def reference64(params: dict, x: np.ndarray) -> np.ndarray:
    """The exact-as-float64 answer from the same (float32) numbers, by NumPy."""
    kernel = np.asarray(params["params"]["kernel"], np.float64)[0, 0]
    bias = np.asarray(params["params"]["bias"], np.float64)
    return np.einsum("nhwc,cd->nhwd", np.asarray(x, np.float64), kernel) + bias


def rounding_bound(params: dict, x: np.ndarray, eps: float) -> float:
    """Worst-case rounding error of a length-C_in dot plus a bias, in a format with `eps`.

    The classic bound |fl(sum) - sum| <= gamma_n * sum |x_i w_i| with gamma_n ~ n*u
    (u = eps/2, n = C_in + 1 terms counting the bias), at the pixel and output channel where
    sum |x_i w_i| + |b| is largest.
    """
    kernel = np.abs(np.asarray(params["params"]["kernel"], np.float64))[0, 0]
    bias = np.abs(np.asarray(params["params"]["bias"], np.float64))
    magnitude = np.einsum("nhwc,cd->nhwd", np.abs(np.asarray(x, np.float64)), kernel) + bias
    n = kernel.shape[0] + 1
    return float(n * eps / 2 * magnitude.max())


def differences(a: Any, b: Any) -> dict[str, float]:
    """Max absolute difference, and the same relative to the largest |b| (normwise)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = np.abs(a - b)
    return {
        "max_abs": float(diff.max()),
        "max_rel": float(diff.max() / np.abs(b).max()),
        "bitwise_equal": bool(np.array_equal(a, b)),
    }


def lowered_as(params: dict, x: jax.Array) -> str:
    """Whether XLA's optimised program for the 1x1 conv holds a convolution or a dot."""
    text = jax.jit(conv_apply).lower(params, x).compile().as_text()
    kinds = [op for op in ("convolution", "dot") if f" {op}(" in text or f"={op}(" in text]
    return " + ".join(kinds) if kinds else "neither (fused or custom call)"


# --- the comparisons -----------------------------------------------------------------------


def compare(x32: np.ndarray, c_out: int) -> dict[str, Any]:
    """Every form against the 1x1 conv and against float64, in float32 and in float64."""
    c_in = x32.shape[-1]
    x = jnp.asarray(x32)
    params = initialise(one_by_one(c_out), SEED + 1, x.shape)
    ref = reference64(params, x32)
    outputs32 = {"1x1 conv": conv_apply(params, x)} | {
        name: fn(params, x) for name, fn in FORMS.items()
    }
    outputs32 = {k: np.asarray(v) for k, v in outputs32.items()}
    rows = []
    for name in FORMS:
        rows.append(row("float32", f"1x1 conv vs {name}", outputs32["1x1 conv"], outputs32[name]))
    for name, out in outputs32.items():
        rows.append(row("float32", f"{name} vs float64 reference", out, ref))

    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64 = jnp.asarray(x32, jnp.float64)
        conv64 = np.asarray(conv_apply(params64, x64))
        assert conv64.dtype == np.float64, "jax x64 mode did not take effect"
        for name, fn in FORMS.items():
            rows.append(
                row("float64", f"1x1 conv vs {name}", conv64, np.asarray(fn(params64, x64)))
            )
        rows.append(row("float64", "1x1 conv vs float64 reference", conv64, ref))
        lowering64 = lowered_as(params64, x64)

    kernel = np.asarray(params["params"]["kernel"])
    return {
        "input_shape": list(x32.shape),
        "output_shape": list(outputs32["1x1 conv"].shape),
        "kernel_shape": list(kernel.shape),
        "params": int(kernel.size + np.asarray(params["params"]["bias"]).size),
        "params_formula": c_in * c_out + c_out,
        "bound32": rounding_bound(params, x32, EPS32),
        "bound64": rounding_bound(params, x32, EPS64),
        "lowered_as": {"float32": lowered_as(params, x), "float64": lowering64},
        "rows": rows,
        "_arrays": {  # for the figure only; not written to the JSON
            "x": x32,
            "conv": outputs32["1x1 conv"],
            "einsum": outputs32["einsum"],
            "ref": ref,
            "kernel": kernel[0, 0],
        },
    }


def row(dtype: str, label: str, a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    return {"dtype": dtype, "comparison": label, **differences(a, b)}


def within(result: dict[str, Any]) -> bool:
    """Every float32 difference within the float32 rounding bound, float64 within float64's."""
    bound = {"float32": result["bound32"], "float64": result["bound64"]}
    return all(r["max_abs"] <= bound[r["dtype"]] for r in result["rows"])


# --- the page ------------------------------------------------------------------------------


def draw(arrays: dict[str, np.ndarray], image: np.ndarray):
    """Photo -> input channels -> the kernel matrix -> conv output, matmul output, differences."""
    x, conv, einsum, ref, kernel = (arrays[k] for k in ("x", "conv", "einsum", "ref", "kernel"))
    c_in, c_out = kernel.shape
    figure = harness.new_figure(14, 7.2)
    axes = figure.subplots(2, 4)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title(f"photo ({image.shape[0]}x{image.shape[1]} RGB)")
    shown = np.argsort(x[0].std(axis=(0, 1)))[::-1][:2]  # the two liveliest maps
    for ax, ch in zip(axes[0, 1:3], shown, strict=True):
        ax.imshow(x[0, :, :, ch], cmap="gray")
        ax.set_title(f"input channel {ch} of {c_in}")
    im = axes[0, 3].imshow(kernel, cmap="RdBu_r", aspect="auto")
    axes[0, 3].set_title(f"1x1 kernel = {c_in}x{c_out} matrix")
    axes[0, 3].set_xlabel("output channel")
    axes[0, 3].set_ylabel("input channel")
    figure.colorbar(im, ax=axes[0, 3], shrink=0.8)
    vmin, vmax = conv[0, :, :, 0].min(), conv[0, :, :, 0].max()
    axes[1, 0].imshow(conv[0, :, :, 0], cmap="viridis", vmin=vmin, vmax=vmax)
    axes[1, 0].set_title(f"1x1 conv: output channel 0 of {c_out}")
    axes[1, 1].imshow(einsum[0, :, :, 0], cmap="viridis", vmin=vmin, vmax=vmax)
    axes[1, 1].set_title("per-pixel matmul (einsum): ch. 0")
    for ax, other, what in (
        (axes[1, 2], einsum, "|conv - matmul|"),
        (axes[1, 3], ref, "|conv (f32) - float64 ref|"),
    ):
        diff = np.abs(conv.astype(np.float64) - other).max(axis=-1)[0]
        im = ax.imshow(diff, cmap="magma", vmin=0, vmax=max(diff.max(), 1e-12))
        note = " (bitwise equal)" if diff.max() == 0 else ""
        ax.set_title(f"{what}, max over ch.\nmax {diff.max():.2g}{note}")
        figure.colorbar(im, ax=ax, shrink=0.8, format="%.1e")
    for ax in axes.flat:
        if ax is not axes[0, 3]:
            ax.set_xticks([])
            ax.set_yticks([])
    figure.suptitle(
        f"A 1x1 convolution {c_in} -> {c_out} channels is a per-pixel matrix product "
        "(float32, same kernel and bias)"
    )
    return figure


def table_rows(result: dict[str, Any]) -> list[list[Any]]:
    bound = {"float32": result["bound32"], "float64": result["bound64"]}
    shape_in = "x".join(map(str, result["input_shape"]))
    shape_out = "x".join(map(str, result["output_shape"]))
    return [
        [
            r["dtype"],
            r["comparison"],
            shape_in,
            shape_out,
            f"{result['params']:,}",
            f"{r['max_abs']:.3g}",
            f"{r['max_rel']:.3g}",
            "yes" if r["bitwise_equal"] else "no",
            "yes" if r["max_abs"] <= bound[r["dtype"]] else "NO",
        ]
        for r in result["rows"]
    ]


def verdict(result: dict[str, Any]) -> str:
    rows = result["rows"]

    def worst(dtype: str, reference: bool) -> float:
        return max(
            r["max_abs"]
            for r in rows
            if r["dtype"] == dtype and r["comparison"].endswith("reference") == reference
        )

    def equal(dtype: str) -> str:
        forms = [
            r for r in rows if r["dtype"] == dtype and not r["comparison"].endswith("reference")
        ]
        n = sum(r["bitwise_equal"] for r in forms)
        return f"{n} of {len(forms)} bitwise equal"

    c_in, c_out = result["kernel_shape"][2:]
    held = within(result) and result["params"] == result["params_formula"]
    return (
        f"**The claim {'held' if held else 'did NOT hold'} as measured.** The 1x1 convolution "
        f"turned {result['input_shape'][1]}x{result['input_shape'][2]}x{c_in} into "
        f"{result['output_shape'][1]}x{result['output_shape'][2]}x{c_out} with "
        f"{result['params']:,} parameters ({c_in}*{c_out} + {c_out} = "
        f"{result['params_formula']:,}). Against the per-pixel matrix product, the einsum and "
        f"the per-pixel Dense layer its largest difference was {worst('float32', False):.2g} "
        f"in float32 ({equal('float32')}) and {worst('float64', False):.2g} in float64 "
        f"({equal('float64')}); every float32 form was within {worst('float32', True):.2g} "
        f"of the float64 reference, inside the worst-case float32 rounding bound for these "
        f"sums ({result['bound32']:.2g}). Differences, where not zero, come from summing the "
        f"same products in a different order, not from a different computation. XLA compiled "
        f"the 1x1 convolution as: {result['lowered_as']['float32']} (float32), "
        f"{result['lowered_as']['float64']} (float64) on {jax.devices()[0].platform}."
    )


def main(argv: Sequence[str] | None = None) -> int:
    run = harness.start("one_by_one", __doc__, argv)
    size = run.pick(smoke=32, quick=224, full=224)
    c_in = run.pick(smoke=8, quick=64, full=64)
    c_out = run.pick(smoke=4, quick=32, full=32)

    image = photo(size + 2)  # the unpadded 3x3 stem takes off one pixel each side
    x = feature_maps(image, c_in)
    result = compare(x, c_out)
    arrays = result.pop("_arrays")

    page = harness.Page(
        run,
        "1x1 convolutions are per-pixel matrix products",
        claim="A 1x1 convolution mixes the channels at each pixel and changes their number: "
        "with C_in inputs and C_out outputs it is a C_in x C_out matrix (plus a bias) applied "
        "to every pixel's channel vector, i.e. a fully connected layer shared by all pixels, "
        "with C_in*C_out + C_out parameters.",
    )
    page.text(
        f"Input: scikit-learn's bundled photograph `{IMAGE}`, centre crop resized to "
        f"{size + 2}x{size + 2}, turned into {size}x{size}x{c_in} feature maps by a seeded, "
        f"unpadded 3x3 convolution + ReLU. "
        f"The 1x1 convolution (`flax.linen.Conv(features={c_out}, kernel_size=(1, 1))`, seeded "
        f"kernel, bias drawn from N(0, 0.1^2) so that the bias path is exercised) is compared "
        f"with the same kernel used as a plain matrix: `jnp.einsum('nhwc,cd->nhwd')`, an "
        f"explicit (N*H*W, C_in) @ (C_in, C_out) product, and a `flax.linen.Dense` applied "
        f"to each pixel's {c_in}-vector under `jax.vmap`. The float64 reference is NumPy's "
        f"float64 einsum of the same float32 numbers; the float64 rows rerun everything with "
        f"jax's x64 mode on (`with jax.enable_x64(True)`, in the same process). Relative "
        f'difference: max |a - b| / max |b|. "within bound": max |a - b| is at most the '
        f"worst-case rounding error of a length-{c_in} dot product plus bias in that format "
        f"(n*eps/2 * max sum |x_i w_i|, n = {c_in + 1}): float32 {result['bound32']:.3g}, "
        f"float64 {result['bound64']:.3g}."
    )
    page.table(
        [
            "dtype",
            "comparison",
            "input",
            "output",
            "parameters",
            "max abs diff",
            "max rel diff",
            "bitwise equal",
            "within bound",
        ],
        table_rows(result),
    )
    page.figure(
        harness.save_figure(draw(arrays, image), run.path(".png")),
        f"Top: the photograph, the two most varied of the {c_in} input feature maps, and the "
        f"1x1 kernel as the "
        f"{c_in}x{c_out} matrix it is. Bottom: output channel 0 of the 1x1 convolution and of "
        f"the per-pixel matrix product (same colour scale), and the per-pixel maximum over "
        f"output channels of |conv - matmul| and of |conv (float32) - float64 reference|.",
    )
    page.heading("Verdict")
    page.text(verdict(result))
    page.heading("Full size")
    page.text(
        "`--full` is identical to `--quick` (224x224, 64 -> 32 channels): the claim is an "
        "identity of arithmetic, so a larger input adds nothing but time. Its command, "
        "for uniformity:\n\n```bash\npython experiments/one_by_one.py --full\n```"
        + ("" if run.full else "\n\nIt was not run for this page; this page is the quick run.")
    )
    page.write(data=result)
    return 0


if __name__ == "__main__":
    harness.main_guard(main)
