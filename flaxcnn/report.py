"""`python -m flaxcnn.report --workdir DIR [IMAGE ...]`: what a trained network sees, as a page.

Writes `DIR/report/index.html` (or `--out OUT/index.html`), a static page with its PNGs
beside it that opens from disk in any browser, for any run directory (trained here,
fine-tuned, or converted from torchvision). Six sections:

1. the run: architecture, parameters, multiply-adds, data set, settings, metrics, checkpoint;
2. learning curves from `metrics.jsonl` (loss, accuracy for every split, learning rate);
3. where it goes wrong on the test split: confusion matrix, per-class accuracy, the most
   confused pairs, the most confidently wrong images with their top-3;
4. the first convolution's filters, how alike they are and how far they moved from their
   initialisation;
5. for each image, the feature maps after every stage (or `--layers`), and their spatial
   contrast stage by stage (how far the image fades to a uniform map);
6. for each image, the top-3 classes with Grad-CAM heat maps at the last stage and an
   input-gradient saliency map.

Layers are found through Flax alone (`nn.intercept_methods` under `jax.eval_shape`), not by
per-architecture code: a *stage* is the last top-level module at each spatial resolution,
so LeNet-5's stages are c1 and c3, a ResNet's the last block of each of its stages. Every
piece is a function returning arrays or matplotlib figures, for notebooks. One jitted
function per purpose (test-split classification, the per-image analysis), each compiled
once. Bad input (a workdir without a checkpoint, an unreadable image, an unknown layer) is
one line and exit 2, and then nothing has been written.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import io
import math
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flaxcnn import cli, evaluate, plot, predict

PathLike = str | os.PathLike
DEFAULT_DIR = "report"
DEFAULT_MAX_IMAGES = 4
TOP = 3  # classes per image and per gallery entry
GALLERY = 12  # most confidently wrong test images shown
PAIRS = 10  # most confused class pairs listed
MAX_CHANNELS = 16  # feature maps shown per stage (the most varied ones)
MAX_FILTERS = 64


# ------------------------------------------------------------------------------- layers


@dataclasses.dataclass(frozen=True)
class Layer:
    """A module whose output is an image-shaped [N, H, W, C] array."""

    name: str  # the module's path, "/"-joined ("layer1_0", "layer1_0/conv1")
    kind: str  # the module's class name
    shape: tuple[int, int, int]  # (H, W, C) of its output


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """What one abstract forward pass tells about a network."""

    layers: tuple[Layer, ...]  # every module with an image-shaped output, in call order
    stages: tuple[Layer, ...]  # the last top-level one at each spatial resolution
    first_conv: str | None  # path of the first nn.Conv called


def anatomy(model, input_shape: Sequence[int]) -> Anatomy:
    """The image-shaped layers of `model` (NHWC `input_shape`), found by intercepting every
    module call during `jax.eval_shape`: no compilation, any architecture."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from flaxcnn.models import summary

    seen: dict[str, Layer] = {}
    convs: list[str] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and module.path:
            name = "/".join(module.path)
            if isinstance(module, nn.Conv) and not convs:
                convs.append(name)
            if getattr(out, "ndim", 0) == 4 and name not in seen:
                seen[name] = Layer(name, type(module).__name__, tuple(out.shape[1:]))
        return out

    variables = summary.init_shapes(model, input_shape)
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    layers = tuple(seen.values())
    return Anatomy(layers, stages_of(layers), convs[0] if convs else None)


def stages_of(layers: Sequence[Layer]) -> tuple[Layer, ...]:
    """The last top-level layer before each change of spatial resolution, and the last one."""
    top = [layer for layer in layers if "/" not in layer.name]
    return tuple(
        layer
        for i, layer in enumerate(top)
        if i + 1 == len(top) or top[i + 1].shape[:2] != layer.shape[:2]
    )


def pick_layers(found: Anatomy, names: Sequence[str] | None) -> tuple[Layer, ...]:
    """The layers named (UsageError for a name the network has not), or its stages."""
    if not names:
        return found.stages
    by_name = {layer.name: layer for layer in found.layers}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        top = [layer.name for layer in found.layers if "/" not in layer.name]
        raise cli.UsageError(
            f"no layer {unknown[0]!r} with an image-shaped output in this network; its "
            f"top-level ones are {', '.join(top)} (inner ones by their path, e.g. "
            f"{found.layers[-1].name})"
        )
    return tuple(by_name[n] for n in dict.fromkeys(names))


# ------------------------------------------------------------------------------- analysis


def spatial_contrast(a):
    """Std over spatial positions, averaged over channels, per image ([N, H, W, C] -> [N])."""
    return a.std(axis=(1, 2)).mean(axis=-1)


def spatial_share(a):
    """sqrt(spatial variance / mean square) per image: 0 for a uniform map, whatever its scale."""
    import jax.numpy as jnp

    return jnp.sqrt(
        a.var(axis=(1, 2)).mean(axis=-1) / jnp.maximum(jnp.mean(a**2, (1, 2, 3)), 1e-30)
    )


def tap(model, names: Sequence[str], target: str | None = None) -> Callable:
    """`(variables, images, delta=None) -> (logits float32, {name: output})`, in eval mode.

    The outputs of the modules `names` are taken as the forward pass makes them (method
    interception: nothing in the model changes); `delta`, where given, is added to the
    output of `target`, so that a gradient with respect to `delta` is the gradient with
    respect to that layer's output (Grad-CAM's).
    """
    import flax.linen as nn
    import jax.numpy as jnp

    from flaxcnn.training import evaluation

    wanted = set(names)

    def apply(variables, images, delta=None):
        taken: dict[str, Any] = {}

        def hook(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and context.module.path:
                name = "/".join(context.module.path)
                if delta is not None and name == target:
                    out = out + delta.astype(out.dtype)
                if name in wanted:
                    taken[name] = out
            return out

        with nn.intercept_methods(hook):
            logits = evaluation.logits(model.apply, variables, images)
        return logits.astype(jnp.float32), {n: taken[n].astype(jnp.float32) for n in names}

    return apply


def make_analyse(model, layers: Sequence[Layer], target: Layer, top: int = TOP) -> Callable:
    """A jitted `(variables, images) -> dict` of everything sections 5 and 6 show.

    `probs` [N, K] and `classes` [N, top]; `maps` {layer: [N, H, W, C]} and `contrast` /
    `share` {layer: [N]} (with `input_contrast`, `input_share`); `cam` [top, N, H, W]:
    Grad-CAM of each of the top classes at `target` (gradients of the class score, the
    logit, with respect to the layer's output; channel weights = their spatial mean; ReLU of
    the weighted sum of channels; bilinearly upsampled to the image, scaled to max 1);
    `saliency` [N, H, W]: max over channels of |d score / d input| of the top class, scaled
    to max 1. One forward pass and `top` backward passes (vmapped) per call.
    """
    import jax
    import jax.numpy as jnp

    names = list(dict.fromkeys([layer.name for layer in layers] + [target.name]))
    forward = tap(model, names, target.name)

    def analyse(variables, images):
        n = images.shape[0]
        delta = jnp.zeros((n, *target.shape), jnp.float32)
        logits, vjp, maps = jax.vjp(
            lambda x, d: forward(variables, x, d), images, delta, has_aux=True
        )
        probs = jax.nn.softmax(logits, axis=-1)
        _, classes = jax.lax.top_k(probs, top)  # [N, top]
        seeds = jax.nn.one_hot(classes.T, logits.shape[-1], dtype=logits.dtype)  # [top, N, K]
        d_input, d_layer = jax.vmap(vjp)(seeds)
        activation = maps[target.name]
        weights = d_layer.mean(axis=(2, 3))  # [top, N, C]
        cam = jax.nn.relu(jnp.einsum("nhwc,tnc->tnhw", activation, weights))
        cam = jax.image.resize(cam, (top, n, *images.shape[1:3]), "bilinear")
        saliency = jnp.abs(d_input[0]).max(axis=-1)
        return {
            "probs": probs,
            "classes": classes,
            "maps": {layer.name: maps[layer.name] for layer in layers},
            "contrast": {layer.name: spatial_contrast(maps[layer.name]) for layer in layers},
            "share": {layer.name: spatial_share(maps[layer.name]) for layer in layers},
            "input_contrast": spatial_contrast(images),
            "input_share": spatial_share(images),
            "cam": cam / jnp.maximum(cam.max(axis=(2, 3), keepdims=True), 1e-30),
            "saliency": saliency / jnp.maximum(saliency.max(axis=(1, 2), keepdims=True), 1e-30),
        }

    return jax.jit(analyse)


def analyse_images(
    model,
    variables: dict,
    images: np.ndarray,
    layers: Sequence[Layer],
    target: Layer,
    top: int = TOP,
) -> dict[str, Any]:
    """`make_analyse` run once on `images`, as host arrays; compiled as the trainer compiles
    its one-shot programs (`xla_flags.compile_once_options`: faster to compile on a CPU)."""
    import jax

    from flaxcnn import xla_flags

    top = min(top, _num_classes(model, variables, images))
    images = np.asarray(images, np.float32)
    options = xla_flags.compile_once_options(jax.default_backend())
    analyse = make_analyse(model, layers, target, top).lower(variables, images)
    out = analyse.compile(compiler_options=options)(variables, images)
    return jax.tree.map(np.asarray, out)


def _num_classes(model, variables, images) -> int:
    import jax

    from flaxcnn.training import evaluation

    x = jax.ShapeDtypeStruct((1, *images.shape[1:]), np.float32)
    shape = jax.eval_shape(lambda v, x: evaluation.logits(model.apply, v, x), variables, x)
    return int(shape.shape[-1])


def filters(variables: dict, first_conv: str) -> np.ndarray:
    """The first convolution's kernel as [filters, kh, kw, in_channels] float32."""
    return np.asarray(_kernel(variables, first_conv), np.float32).transpose(3, 0, 1, 2)


def _kernel(variables: dict, path: str):
    node = variables["params"]
    for key in path.split("/"):
        node = node[key]
    return node["kernel"]


def filter_measures(kernels: np.ndarray, initial: np.ndarray | None = None) -> dict[str, float]:
    """How alike the filters are and how far they moved: `mean_abs_cosine` / `max_abs_cosine`
    between two different filters (0: all orthogonal, 1: the same up to scale), and with the
    initial kernels, `init_mean_abs_cosine` and `moved` = ||W - W0|| / ||W0||."""
    flat = kernels.reshape(len(kernels), -1).astype(np.float64)
    out = cosine_stats(flat)
    if initial is not None:
        init = initial.reshape(len(initial), -1).astype(np.float64)
        init_stats = cosine_stats(init)
        out["init_mean_abs_cosine"] = init_stats["mean_abs_cosine"]
        out["moved"] = float(np.linalg.norm(flat - init) / max(np.linalg.norm(init), 1e-30))
    return out


def cosine_stats(flat: np.ndarray) -> dict[str, float]:
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    unit = flat / np.where(norms > 0, norms, 1.0)
    cos = np.abs(unit @ unit.T)[~np.eye(len(flat), dtype=bool)]
    if cos.size == 0:
        return {"mean_abs_cosine": math.nan, "max_abs_cosine": math.nan}
    return {"mean_abs_cosine": float(cos.mean()), "max_abs_cosine": float(cos.max())}


def initial_filters(model, input_shape: Sequence[int], seed: int, first_conv: str) -> np.ndarray:
    """The first convolution's kernel as the trainer draws it for a run of `seed`
    (`training.state.create_state`'s key), as `filters` returns it. Only that leaf leaves
    the compiled initialiser, so XLA drops the rest of it."""
    import jax
    import jax.numpy as jnp

    from flaxcnn.training.state import compile_once

    init_key, _ = jax.random.split(jax.random.key(seed))
    keys = {"params": init_key, "dropout": init_key}
    kernel = compile_once(
        lambda: _kernel(model.init(keys, jnp.zeros(input_shape), train=False), first_conv)
    )()
    return np.asarray(kernel, np.float32).transpose(3, 0, 1, 2)


# ------------------------------------------------------------------------------- test split


def classify_test_split(
    model,
    variables: dict,
    dataset,
    meta: dict,
    batch_size: int,
    keep: int = GALLERY,
    top: int = TOP,
) -> dict[str, Any]:
    """Every test example once, as `evaluate` classifies it (`evaluate.predictions`), with
    each one's `top` classes and probabilities; plus the `keep` most confidently wrong
    examples' images (`wrong_images`, `wrong_index`), kept batch by batch so that the split
    never has to fit in memory."""
    import jax

    from flaxcnn import data

    classify = evaluate.make_classify(model, variables, top=min(top, meta["num_classes"]))
    kept: list[tuple[float, int, np.ndarray]] = []  # (confidence, index, image)
    masks: list[np.ndarray] = []  # of the batches read so far (the padding is masked out)
    seen = 0

    def run(images, labels):
        nonlocal seen
        out = jax.tree.map(np.asarray, classify(images, labels))
        real = masks[-1]
        index = seen + np.cumsum(real) - 1
        for i in np.flatnonzero(real & (out["pred"] != np.asarray(labels))):
            kept.append((float(out["top_probs"][i, 0]), int(index[i]), np.asarray(images[i])))
        kept.sort(key=lambda k: -k[0])
        del kept[keep:]
        seen += int(real.sum())
        return out

    batches = data.eval_batches(
        dataset,
        global_batch_size=batch_size,
        image_size=meta["image_size"],
        channels=meta["in_channels"],
        process_index=0,
        process_count=1,
    )
    out = evaluate.predictions(run, _track(batches, masks))
    return {
        **out,
        "confusion_matrix": evaluate.confusion_matrix(
            out["label"], out["pred"], meta["num_classes"]
        ),
        "wrong_index": np.asarray([k[1] for k in kept], int),
        "wrong_images": np.stack([k[2] for k in kept]) if kept else np.zeros((0, 1, 1, 1)),
    }


def _track(batches, masks: list):
    for batch in batches:
        masks.append(np.asarray(batch["mask"], bool))
        yield batch


def confused_pairs(confusion: np.ndarray, n: int = PAIRS) -> list[tuple[int, int, int]]:
    """The `n` largest off-diagonal counts as (true, predicted, count), largest first."""
    off = np.array(confusion, np.int64)
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:n]
    pairs = [
        (int(i), int(j), int(off[i, j]))
        for i, j in zip(*np.unravel_index(order, off.shape), strict=False)
    ]
    return [p for p in pairs if p[2] > 0]


# ------------------------------------------------------------------------------- figures


def to_display(image: np.ndarray, preprocessing: dict | None) -> np.ndarray:
    """A network input [H, W, C] as a 0..1 picture: the normalisation undone where it is
    known, else stretched to its range; one channel as [H, W]."""
    x = np.asarray(image, np.float32)
    if preprocessing is not None:
        x = x * np.asarray(preprocessing["std"], np.float32) + np.asarray(preprocessing["mean"])
    else:
        x = (x - x.min()) / max(float(x.max() - x.min()), 1e-12)
    x = np.clip(x, 0.0, 1.0)
    return x[..., 0] if x.shape[-1] == 1 else x


def _show(ax, picture: np.ndarray, title: str | None = None, **kwargs) -> None:
    if picture.ndim == 2 and "cmap" not in kwargs:
        kwargs["cmap"] = "gray"
    ax.imshow(picture, **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def curves_figure(records: list[dict]):
    """Loss (log axis where it spans more than a decade), accuracy for every split recorded,
    and the learning rate, against the epoch."""
    figure = plot.new_figure(13, 3.8)
    loss_ax, acc_ax, lr_ax = figure.subplots(1, 3)
    splits = list(dict.fromkeys(r["split"] for r in records if "split" in r))
    losses = []
    for i, split in enumerate(splits):
        style = {"marker": "o", "markersize": 3, "color": f"C{i}", "label": split}
        for ax, key in ((loss_ax, "loss"), (acc_ax, "accuracy")):
            epochs, values = plot.curve(records, split, key)
            if epochs:
                ax.plot(epochs, values, **style)
                if key == "loss":
                    losses += values
    positive = [v for v in losses if v > 0]
    if positive and max(positive) / min(positive) > 10:
        loss_ax.set_yscale("log")
    epochs, lrs = plot.curve(records, "train", "lr")
    lr_ax.plot(epochs, lrs, marker="o", markersize=3, color="k")
    loss_ax.set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    acc_ax.set(title="top-1 accuracy", xlabel="epoch", ylim=(0, 1.02))
    lr_ax.set(title="learning rate (end of epoch)", xlabel="epoch")
    for ax in (loss_ax, acc_ax, lr_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in (loss_ax, acc_ax):
        if ax.lines:
            ax.legend(fontsize="small")
    return figure


def per_class_figure(accuracy: np.ndarray, labels: Sequence[str]):
    """Per-class accuracy as bars, worst first (at most 40 classes: the worst)."""
    order = np.argsort(np.nan_to_num(accuracy, nan=2.0), kind="stable")[:40]
    figure = plot.new_figure(max(5.0, 0.28 * len(order) + 2), 3.2)
    ax = figure.subplots()
    ax.bar(range(len(order)), accuracy[order], color="C0")
    ax.set_xticks(range(len(order)), [labels[i][:14] for i in order], rotation=90, fontsize=7)
    ax.set(ylim=(0, 1.02), ylabel="accuracy", title="per-class accuracy (worst first)")
    ax.grid(alpha=0.3, axis="y")
    return figure


def gallery_figure(
    images: np.ndarray,
    labels: np.ndarray,
    top_classes: np.ndarray,
    top_probs: np.ndarray,
    names: Sequence[str],
    preprocessing: dict | None,
):
    """The confidently wrong test images, each titled with its true class and top-3."""
    n = len(images)
    cols = min(n, 6)
    rows = math.ceil(n / cols)
    figure = plot.new_figure(1.7 * cols, 2.1 * rows)
    axes = np.atleast_1d(figure.subplots(rows, cols)).ravel()
    for ax in axes[n:]:
        ax.axis("off")
    for ax, image, label, classes, probs in zip(
        axes, images, labels, top_classes, top_probs, strict=False
    ):
        lines = [f"true: {names[label][:16]}"] + [
            f"{names[c][:16]} {p:.2f}" for c, p in zip(classes, probs, strict=True)
        ]
        _show(ax, to_display(image, preprocessing), "\n".join(lines))
    return figure


def filters_figure(kernels: np.ndarray, title: str):
    """The first layer's filters as pictures: RGB where the input has three channels (each
    filter scaled around grey by its own largest weight), else red/blue for +/-."""
    kernels = kernels[:MAX_FILTERS]
    n = len(kernels)
    cols = min(n, 16)
    rows = math.ceil(n / cols)
    figure = plot.new_figure(0.8 * cols + 0.5, 0.85 * rows + 0.6)
    axes = np.atleast_1d(figure.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for f, (ax, k) in enumerate(zip(axes, kernels, strict=False)):
        limit = float(np.abs(k).max()) or 1.0
        if k.shape[-1] == 3:
            ax.imshow(0.5 + 0.5 * k / limit)
        else:
            ax.imshow(k.mean(-1), cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(str(f + 1), fontsize=6)
    figure.suptitle(title, fontsize=9)
    return figure


def most_varied(maps: np.ndarray, n: int = MAX_CHANNELS) -> np.ndarray:
    """Indices of the `n` channels of one [H, W, C] map with the largest spatial std."""
    return np.argsort(-maps.std(axis=(0, 1)), kind="stable")[:n]


def mosaic(maps: np.ndarray, channels: Sequence[int]) -> np.ndarray:
    """The `channels` of one [H, W, C] map side by side, each scaled to 0..1 over its own
    range, separated by a column of NaN (drawn blank): one picture a layer, which draws
    many times faster than a subplot a channel."""
    height = maps.shape[0]
    tiles = []
    for channel in channels:
        m = maps[..., channel].astype(np.float32)
        span = float(m.max() - m.min())
        tiles += [
            (m - m.min()) / span if span > 0 else np.zeros_like(m),
            np.full((height, 1), np.nan),
        ]
    return np.concatenate(tiles[:-1], axis=1)


def feature_maps_figure(picture: np.ndarray, maps: dict[str, np.ndarray], title: str = ""):
    """One image and, a row per layer, its most varied channels (each scaled to its own
    range), labelled with their channel numbers."""
    from matplotlib import colormaps

    cmap = colormaps["magma"].with_extremes(bad="white")
    figure = plot.new_figure(13, 1.0 * len(maps) + 0.9)
    grid = figure.add_gridspec(len(maps), 2, width_ratios=[1, MAX_CHANNELS])
    _show(figure.add_subplot(grid[:, 0]), picture, "input")
    for r, (name, m) in enumerate(maps.items()):
        channels = most_varied(m)
        ax = figure.add_subplot(grid[r, 1])
        ax.imshow(mosaic(m, channels), cmap=cmap, vmin=0, vmax=1, aspect="equal")
        ax.set_xticks(
            (np.arange(len(channels)) + 0.5) * (m.shape[1] + 1) - 1,
            [f"#{c}" for c in channels],
            fontsize=6,
        )
        ax.set_yticks([])
        ax.tick_params(length=0)
        ax.set_ylabel(
            f"{name}\n{'x'.join(map(str, m.shape))}",
            fontsize=7,
            rotation=0,
            ha="right",
            va="center",
        )
    if title:
        figure.suptitle(title, fontsize=9)
    return figure


def contrast_figure(names: Sequence[str], contrast: np.ndarray, labels: Sequence[str]):
    """Each image's spatial contrast after every layer relative to its input's (log axis)."""
    figure = plot.new_figure(max(5.0, 0.5 * len(names) + 3), 3.4)
    ax = figure.subplots()
    for i, label in enumerate(labels):
        ax.plot(range(len(names)), contrast[i], marker="o", label=label)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    if np.all(contrast > 0):
        from matplotlib import ticker

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set(ylabel="spatial contrast / input's", title="contrast stage by stage")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return figure


def decision_figure(
    picture: np.ndarray,
    cams: np.ndarray,
    saliency: np.ndarray,
    classes: Sequence[tuple[str, float]],
    layer: str,
):
    """The image, a Grad-CAM overlay for each of its top classes, and the saliency map."""
    cols = len(cams) + 2
    figure = plot.new_figure(2.0 * cols, 2.4)
    axes = figure.subplots(1, cols)
    _show(axes[0], picture, "input")
    shown = picture if picture.ndim == 3 else np.repeat(picture[..., None], 3, -1)
    for ax, cam, (name, p) in zip(axes[1:], cams, classes, strict=False):
        _show(ax, shown, f"Grad-CAM: {name[:18]}\np = {p:.3f}")
        ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    _show(axes[-1], saliency, "saliency |d score/d input|", cmap="hot")
    figure.suptitle(f"Grad-CAM at {layer}", fontsize=8)
    return figure


def png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=plot.DPI)
    return buffer.getvalue()


# ------------------------------------------------------------------------------- the page


class Page:
    """An HTML page and its PNGs, kept in memory until `write`."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []
        self.files: dict[str, bytes] = {}

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
            for row in rows
        )
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def figure(self, name: str, figure, caption: str) -> None:
        self.files[name] = png_bytes(figure)
        self.parts.append(
            f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    def html(self) -> str:
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(self.title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(self.title)}</h1>" + "\n".join(self.parts) + "</body></html>\n"
        )

    def write(self, out: Path) -> Path:
        """The PNGs, then index.html, each through a temporary file renamed into place."""
        out.mkdir(parents=True, exist_ok=True)
        for name, content in {**self.files, "index.html": self.html().encode()}.items():
            target = out / name
            tmp = out / f".{name}.{secrets.token_hex(4)}.tmp"
            try:
                tmp.write_bytes(content)
                os.replace(tmp, target)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise cli.UsageError(f"cannot write {target}: {e.strerror or e}") from None
        return out / "index.html"


STYLE = (
    "body{font-family:sans-serif;max-width:1300px;margin:auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
    "padding:2px 8px;font-size:13px;text-align:left}img{max-width:100%}"
    "figure{margin:1em 0}figcaption{font-size:13px;color:#555}"
)


def check_out(out: Path) -> Path:
    """UsageError unless a page can be written to `out` (a directory, made where missing)."""
    if out.exists() and not out.is_dir():
        raise cli.UsageError(f"cannot write the report to {out}: it is not a directory")
    parent = out if out.exists() else out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise cli.UsageError(f"cannot write the report to {out}: {parent} is not writable")
    return out


def fmt(value: Any, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def run_rows(
    run,
    meta: dict,
    step: int,
    config: dict,
    records: list[dict],
    params: int,
    macs: int,
    dataset_info,
    why: str,
) -> list[tuple[str, str]]:
    """Section 1's table: what the run is, as (what, value); `why` says why this checkpoint
    (the best on validation accuracy, the latest, the one asked for)."""
    rows = [
        ("workdir", str(run.path)),
        ("architecture", f"{meta['arch']} ({meta.get('dtype', 'float32')} compute)"),
        (
            "options",
            ", ".join(f"{k}={v}" for k, v in (meta.get("model_options") or {}).items()) or "none",
        ),
        ("parameters", f"{params:,}"),
        ("multiply-adds per image", f"{macs:,} ({macs / 1e9:.3f} G)"),
        ("input", f"{meta['image_size']}x{meta['image_size']}x{meta['in_channels']}"),
        ("data set", f"{meta['dataset']}, {meta['num_classes']} classes"),
        (
            "checkpoint",
            f"step {step} of {', '.join(map(str, run.checkpoint_steps()))}: {why}",
        ),
    ]
    stored = config.get("data") or {}
    if stored.get("num_train"):  # as the run split them (its validation images held out)
        counts = [(stored["num_train"], "train"), (stored.get("num_val"), "validation")]
        counts.append((stored.get("num_test"), "test"))
        rows.append(("splits", ", ".join(f"{n} {name}" for n, name in counts if n)))
    elif dataset_info is not None:
        splits = [f"{dataset_info.num_train} train", f"{dataset_info.num_test} test"]
        rows.append(("splits", ", ".join(splits)))
    for key in (
        "epochs",
        "batch_size",
        "optimizer",
        "lr",
        "schedule",
        "weight_decay",
        "label_smoothing",
        "seed",
        "devices",
        "parallel",
        "init_from",
    ):
        if config.get(key) is not None:
            rows.append((key.replace("_", " "), str(config[key])))
    if run.config_path.is_file() and run.metrics_path.is_file():
        seconds = run.metrics_path.stat().st_mtime - run.config_path.stat().st_mtime
        rows.append(("wall time", f"{seconds:.0f} s (config.json written to last metrics line)"))
    for split in dict.fromkeys(r["split"] for r in records if "split" in r):
        epochs, accs = plot.curve(records, split, "accuracy")
        if epochs:
            best = int(np.argmax(accs))
            rows.append(
                (
                    f"{split} accuracy",
                    f"final {accs[-1]:.4f} (epoch {epochs[-1]}), "
                    f"best {accs[best]:.4f} (epoch {epochs[best]})",
                )
            )
    return rows


def build_report(
    workdir: PathLike,
    images: Sequence[PathLike] = (),
    *,
    out: PathLike | None = None,
    layers: Sequence[str] | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    step: int | None = None,
    data_dir: PathLike | None = None,
    batch_size: int | None = None,
) -> Path:
    """Write the report of a run and return the path of its index.html.

    Without `images`, the first `max_images` test images of the run's data set; with them,
    the first `max_images` of those. Raises UsageError, having written nothing, for bad
    input: a missing workdir or one without a checkpoint, an unreadable image, an unknown
    layer name, a data set that cannot be loaded where no image is given.
    """
    from flaxcnn.training.rundir import RunDir  # here: it loads jax

    if max_images < 1:
        raise cli.UsageError(f"--max-images must be at least 1, got {max_images}")
    run = RunDir.existing(workdir)
    run.require_checkpoint(step)
    out = check_out(Path(out) if out is not None else run.path / DEFAULT_DIR)
    pixels = [(str(p), predict.load_image(p)) for p in list(images)[:max_images]]
    config = run.read_config()
    records = run.read_metrics() if run.metrics_path.is_file() else []

    asked = step is not None
    step, meta, variables = run.restore_variables(step)
    model = evaluate.build_model(meta, variables)
    input_shape = (1, meta["image_size"], meta["image_size"], meta["in_channels"])
    found = anatomy(model, input_shape)
    chosen = pick_layers(found, layers)
    if not found.stages:
        raise cli.UsageError(f"{meta['arch']} has no layer with an image-shaped output")
    target = found.stages[-1]
    labels = predict.class_labels(meta)

    dataset, data_problem = None, None
    try:
        dataset = evaluate.load_test_split(
            meta,
            data_dir if data_dir is not None else config.get("data_dir"),
            bool(config.get("skip_corrupt", False)),
        )
    except cli.UsageError as e:
        data_problem = str(e).splitlines()[0]
        if not pixels:
            raise cli.UsageError(
                f"no IMAGE given and the run's test split cannot be read ({data_problem})"
            ) from None
    if pixels:
        preprocessing = predict.resolve_preprocessing(meta, config)
        inputs = np.stack(
            [predict.preprocess(p, preprocessing, meta["in_channels"]) for _, p in pixels]
        )
        captions = [Path(name).name for name, _ in pixels]
    else:
        preprocessing = meta.get("preprocessing")
        inputs, truth = first_test_images(
            dataset, meta["image_size"], meta["in_channels"], max_images
        )
        captions = [f"test image {i + 1} ({labels[t]})" for i, t in enumerate(truth)]

    page = Page(f"What {meta['arch']} sees: {run.path.resolve().name}")
    page.text(f"python -m flaxcnn.report --workdir {run.path}: checkpoint step {step}.")
    write_run(page, run, model, meta, variables, step, asked, config, records, dataset, input_shape)
    write_curves(page, run, records)
    write_mistakes(
        page,
        model,
        variables,
        meta,
        step,
        labels,
        dataset,
        data_problem,
        preprocessing,
        batch_size or config.get("batch_size"),
    )
    write_filters(page, model, variables, meta, config, found, input_shape)
    analysis = analyse_images(model, variables, inputs, chosen, target)
    pictures = [to_display(x, preprocessing) for x in inputs]
    write_stages(page, analysis, chosen, pictures, captions)
    write_decisions(page, analysis, target, pictures, captions, labels)
    return page.write(out)


def first_test_images(
    dataset, image_size: int, channels: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` test images, preprocessed and normalised exactly as in evaluation,
    and their labels."""
    from flaxcnn import data

    batches = data.eval_batches(
        dataset,
        global_batch_size=count,
        image_size=image_size,
        channels=channels,
        process_index=0,
        process_count=1,
    )
    batch = next(iter(batches))
    mask = np.asarray(batch["mask"], bool)
    return np.asarray(batch["image"])[mask], np.asarray(batch["label"])[mask]


def write_run(
    page: Page, run, model, meta, variables, step, asked, config, records, dataset, input_shape
) -> None:
    from flaxcnn.models import summary

    params = summary.tree_size(variables["params"])
    macs = summary.total_macs(model, input_shape)
    info = dataset.info if dataset is not None else None
    page.heading("1. The run")
    why = run.why_checkpoint(step, asked)
    rows = run_rows(run, meta, step, config, records, params, macs, info, why)
    page.table(("", ""), rows)


def write_curves(page: Page, run, records: list[dict]) -> None:
    page.heading("2. Learning curves")
    if not records:
        page.text(
            f"{run.path} has no metrics.jsonl records (weights converted, not trained "
            "here): no curves."
        )
        return
    page.figure(
        "curves.png",
        curves_figure(records),
        "Loss (log axis where it spans more than a decade) and top-1 accuracy of "
        "every split recorded, and the learning rate, per epoch.",
    )


def write_mistakes(
    page: Page, model, variables, meta, step, labels, dataset, problem, preprocessing, batch_size
) -> None:
    page.heading("3. Where it goes wrong")
    if dataset is None:
        page.text(f"The test split could not be read: {problem}.")
        return
    test = classify_test_split(
        model, variables, dataset, meta, batch_size or evaluate.DEFAULT_BATCH_SIZE
    )
    confusion = test["confusion_matrix"]
    total = int(confusion.sum())
    top1 = float(np.trace(confusion)) / max(total, 1)
    top5 = float(test["correct_top5"].mean()) if "correct_top5" in test else None
    page.text(
        f"{total} test images, top-1 accuracy {top1:.4f}"
        + (f", top-5 {top5:.4f}" if top5 is not None else "")
        + f", checkpoint step {step}."
    )
    result = {
        "arch": meta["arch"],
        "dataset": meta["dataset"],
        "step": step,
        "top1": top1,
        "top5": top5,
        "class_names": labels,
        "confusion_matrix": confusion,
    }
    page.figure(
        "confusion.png",
        evaluate.confusion_figure(result),
        "Confusion matrix (evaluate's): rows the true class, columns the predicted "
        "one, coloured by the share of the true class.",
    )
    page.figure(
        "per_class.png",
        per_class_figure(evaluate.per_class_accuracy(confusion), labels),
        "Accuracy of each class on the test split, worst first.",
    )
    rows = [
        (labels[i], labels[j], c, f"{c / max(confusion[i].sum(), 1):.3f}")
        for i, j, c in confused_pairs(confusion)
    ]
    page.text("The most confused pairs (a true class taken for another):")
    page.table(("true class", "predicted as", "images", "share of the true class"), rows)
    idx = test["wrong_index"]
    if not len(idx):
        page.text("No test image is misclassified.")
        return
    figure = gallery_figure(
        test["wrong_images"],
        test["label"][idx],
        test["top_classes"][idx],
        test["top_probs"][idx],
        labels,
        preprocessing,
    )
    page.figure(
        "wrong.png",
        figure,
        "The most confidently wrong test images: the true class, "
        "then the top predictions with their probabilities.",
    )


def write_filters(page: Page, model, variables, meta, config, found: Anatomy, input_shape) -> None:
    page.heading("4. What the first layer learned")
    if found.first_conv is None:
        page.text("This network has no convolution.")
        return
    kernels = filters(variables, found.first_conv)
    seed = config.get("seed")
    trained_here = seed is not None and not config.get("init_from")
    initial = initial_filters(model, input_shape, seed if trained_here else 0, found.first_conv)
    measures = filter_measures(kernels, initial)
    start = (
        f"its initialisation (seed {seed}, as the trainer draws it)"
        if trained_here
        else "a fresh random initialisation (seed 0; the run did not start from one)"
    )
    kh, kw, cin = kernels.shape[1:]
    page.figure(
        "filters.png",
        filters_figure(kernels, f"{found.first_conv}: {len(kernels)} filters {kh}x{kw}x{cin}"),
        "The first convolution's filters"
        + (" as RGB pictures (grey = 0)" if cin == 3 else " (red positive, blue negative weights)")
        + (f"; the first {MAX_FILTERS} of {len(kernels)}" if len(kernels) > MAX_FILTERS else "")
        + ".",
    )
    page.table(
        ("measure", "value"),
        [
            (
                "mean |cosine| between two filters (0: all different, 1: the same)",
                fmt(measures["mean_abs_cosine"], ".3f"),
            ),
            ("largest |cosine| between two filters", fmt(measures["max_abs_cosine"], ".3f")),
            ("the same mean at initialisation", fmt(measures["init_mean_abs_cosine"], ".3f")),
            (f"distance from {start}, ||W - W0|| / ||W0||", fmt(measures["moved"], ".3f")),
        ],
    )


def write_stages(page: Page, analysis: dict, layers: Sequence[Layer], pictures, captions):
    page.heading("5. What each stage sees")
    page.text(
        "For each image, the feature maps after every layer shown, a row each: the "
        f"{MAX_CHANNELS} channels that vary most over the image, each scaled to its own "
        "range (bright = strong response)."
    )
    for i, (picture, caption) in enumerate(zip(pictures, captions, strict=True)):
        maps = {layer.name: analysis["maps"][layer.name][i] for layer in layers}
        page.figure(
            f"maps{i + 1}.png",
            feature_maps_figure(picture, maps, caption),
            f"Feature maps of {caption}.",
        )
    names = [layer.name for layer in layers]
    relative = np.stack([analysis["contrast"][n] for n in names], axis=1)
    relative = relative / np.maximum(analysis["input_contrast"], 1e-30)[:, None]
    page.figure(
        "contrast.png",
        contrast_figure(names, relative, captions),
        "Spatial contrast (std over positions, averaged over channels) after each "
        "layer, relative to the input's: where it falls towards 0 the image fades "
        "to a uniform map.",
    )
    rows = [
        (
            n,
            "x".join(map(str, layer.shape)),
            *(
                f"{relative[i, j]:.3g} / {analysis['share'][n][i]:.2f}"
                for i in range(len(captions))
            ),
        )
        for j, (n, layer) in enumerate(zip(names, layers, strict=True))
    ]
    page.table(("layer", "output", *(f"{c}: contrast / spatial share" for c in captions)), rows)


def write_decisions(page: Page, analysis: dict, target: Layer, pictures, captions, labels):
    page.heading("6. Why it decides")
    page.text(
        f"For each image: its top classes with their probabilities, a Grad-CAM heat map "
        f"for each at {target.name} ({'x'.join(map(str, target.shape))}, the last stage: "
        "the class score's gradient averaged over positions weighs the channels; ReLU of "
        "the weighted sum, upsampled to the image), and the input-gradient saliency of "
        "the top class (max over channels of |d score / d pixel|)."
    )
    for i, (picture, caption) in enumerate(zip(pictures, captions, strict=True)):
        classes = [(labels[c], float(analysis["probs"][i, c])) for c in analysis["classes"][i]]
        figure = decision_figure(
            picture, analysis["cam"][:, i], analysis["saliency"][i], classes, target.name
        )
        page.figure(
            f"decision{i + 1}.png",
            figure,
            f"{caption}: " + ", ".join(f"{name} {p:.3f}" for name, p in classes) + ".",
        )


# ------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m flaxcnn.report",
        description="A static HTML page on what a run's network sees: the run, its curves, "
        "its mistakes, its first-layer filters, feature maps stage by stage, Grad-CAM and "
        "saliency.",
    )
    parser.add_argument("--workdir", required=True, help="the run's workdir")
    parser.add_argument(
        "images",
        nargs="*",
        metavar="IMAGE",
        help="image files to look through (default: the first test images)",
    )
    parser.add_argument("--out", help=f"directory of the page (default: WORKDIR/{DEFAULT_DIR})")
    parser.add_argument(
        "--layers",
        action="append",
        help="comma-separated layer names to show instead of the stages "
        "(module paths, e.g. layer1_0,layer2_0/conv1); repeatable",
    )
    parser.add_argument(
        "--max-images",
        type=int,
        default=DEFAULT_MAX_IMAGES,
        help=f"images looked through (default: {DEFAULT_MAX_IMAGES})",
    )
    parser.add_argument(
        "--step", type=int, help="checkpoint step (default: the best, else the latest)"
    )
    parser.add_argument("--data-dir", help="where the data set is prepared (default: the run's)")
    parser.add_argument("--batch-size", type=int, help="test examples per batch")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    layers = [n.strip() for group in args.layers or [] for n in group.split(",") if n.strip()]
    try:
        path = build_report(
            args.workdir,
            args.images,
            out=args.out,
            layers=layers or None,
            max_images=args.max_images,
            step=args.step,
            data_dir=args.data_dir,
            batch_size=args.batch_size,
        )
    except cli.UsageError as e:
        cli.fail(str(e))
    print(f"wrote {path}")


if __name__ == "__main__":
    cli.run_main(main)
