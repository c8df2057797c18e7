"""What the layers see: each first-layer filter picks out its own feature, and a deep plain
stack fades the image where a residual one keeps it.

The course's claim: each filter of a convolution picks out its own feature (a horizontal
edge, a vertical edge, a colour, a shape); and in a very deep *plain* stack the image fades,
after enough convolutions, to an almost uniform map, while residual connections keep it
(and keep the gradient flowing to the first layer).

Measured here, in two parts:

1. LeNet-5 trained on the embedded digits (32x32): its six 5x5 first-layer filters, each
   filter's response to step edges in 24 directions (preferred direction, orientation
   selectivity, against the same filters at initialisation), how alike the six feature maps
   are over the test split, and one test image's feature maps after C1 and after C3.
2. plainN and resnetN (He et al.'s CIFAR nets, N = 20/56/110): on one batch of real images,
   the spatial contrast of every residual block's output (the std over spatial positions,
   averaged over channels and images, divided by the same for the input) and the gradient
   norm of the cross-entropy reaching every block's conv kernels and the first conv layer,
   at initialisation and after training; with BatchNorm on batch statistics (as in
   training) and on its running statistics (at initialisation these are mean 0, variance
   1, so BatchNorm is the identity: the network without normalisation).

    python experiments/feature_maps.py --smoke  # LeNet-5 1 epoch; 20-layer pair at init, 8x8
    python experiments/feature_maps.py          # --quick: LeNet-5 15 epochs; 20/56/110 at
                                                #   init, 20/56 trained 4 epochs, 16x16 digits
    python experiments/feature_maps.py --full   # LeNet-5 30 epochs; all six nets trained
                                                #   50 epochs on cifar10 at 32x32
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import harness
import numpy as np

from flaxcnn import cli, report

FILTER_ARCH = "lenet5"  # 5x5 first-layer filters: large enough to see what they detect
FIRST_CONV, SECOND_CONV = "c1", "c3"  # LeNet-5's two convolutional layers
N_DIRECTIONS = 24  # step-edge probes, every 15 degrees (no tie between orientation classes)
FAMILIES = ("plain", "resnet")
BN_MODES = ("batch", "running")  # BatchNorm on batch statistics / on its running averages
BLOCK_NAME = re.compile(r"^layer(\d+)_(\d+)$")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that differs between --smoke, --quick and --full."""

    filter_epochs: int
    depths: tuple[int, ...]
    trained_depths: tuple[int, ...]
    depth_dataset: str
    depth_image_size: int
    depth_epochs: int
    depth_batch: int
    probe_batch: int


def settings_for(run: harness.Run) -> Settings:
    return Settings(
        filter_epochs=run.pick(smoke=1, quick=15, full=30),
        depths=run.pick(smoke=(20,), quick=(20, 56, 110), full=(20, 56, 110)),
        # 110-layer nets take too long to train on a 2-core CPU: quick measures them at init.
        trained_depths=run.pick(smoke=(), quick=(20, 56), full=(20, 56, 110)),
        depth_dataset=run.pick(smoke="digits", quick="digits", full="cifar10"),
        depth_image_size=run.pick(smoke=8, quick=16, full=32),
        depth_epochs=run.pick(smoke=0, quick=4, full=50),
        # 64 on digits: 22 steps an epoch (128 leaves the plain nets at chance in 4 epochs).
        depth_batch=run.pick(smoke=64, quick=64, full=128),
        probe_batch=run.pick(smoke=16, quick=64, full=128),
    )


# ---------------------------------------------------------------------------------------
# Data and training: all through flaxcnn's public functions.


def load_dataset(name: str, data_dir: str | None):
    from flaxcnn import data

    try:
        return data.load(name, data_dir=data_dir)
    except ValueError as e:  # DatasetNotPrepared too: one line, exit 2
        raise cli.UsageError(str(e)) from None


def train_and_restore(
    run: harness.Run, arch: str, dataset: str, image_size: int, epochs: int, batch_size: int = 128
) -> tuple[Any, dict, dict]:
    """Train `arch` with the library's trainer; (model, variables, final test metrics)."""
    from flaxcnn.evaluate import build_model
    from flaxcnn.training import TrainConfig, train
    from flaxcnn.training.rundir import RunDir

    workdir = run.train_workdir(f"{arch}-{dataset}-{image_size}")
    config = TrainConfig(
        arch=arch,
        dataset=dataset,
        image_size=image_size,
        epochs=epochs,
        batch_size=batch_size,
        workdir=str(workdir),
        data_dir=run.data_dir,
        progress=False,
    )
    metrics = train(config, out=lambda line: print(f"  [{arch}] {line}"))
    _, meta, variables = RunDir(workdir).restore_variables()
    return build_model(meta), variables, metrics


# The programs this script compiles itself run once or twice (an initialisation; a probe,
# at init and, with --quick, after training), so their compile is nearly all they cost: on
# a CPU they are compiled at LLVM -O0, which compiled resnet20's probe in 4.4 s against
# 10.6 s at XLA's default -O3 (plain20: 2.7 against 6.3 s; its initialisation 1.0 against
# 2.3 s at flaxcnn's one-shot -O2; a busy 2-core AMD EPYC). The probe still runs in under 0.1 s
# and its numbers agree with -O3's to float32 rounding (1e-6 relative). Not when XLA_FLAGS
# sets the level or FLAXCNN_XLA_DEFAULTS=0.
RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": 0}


def compile_run_once(fn: Callable, *args) -> Callable:
    """The jitted `fn` compiled for `args`' shapes, with `RUN_ONCE_OPTIONS` on a CPU."""
    import jax

    from flaxcnn import xla_flags

    options = xla_flags.compile_once_options(jax.default_backend())
    if options is not None:  # on CPU, flaxcnn's one-shot options, unless the user opted out
        options = {**options, **RUN_ONCE_OPTIONS}
    return fn.lower(*args).compile(compiler_options=options)


def init_variables(arch: str, num_classes: int, image_size: int, channels: int) -> tuple:
    """A freshly initialised network (seed 0): what training starts from (its own draw:
    the trainer splits its seed's key first)."""
    import jax
    import jax.numpy as jnp

    from flaxcnn import models

    model = models.create(arch, num_classes=num_classes)
    x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
    # One compiled program, as the trainer does: op by op, ResNet-20's init compiled ~40.
    variables = compile_run_once(jax.jit(lambda: model.init(jax.random.key(0), x, train=False)))()
    return model, {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


# ---------------------------------------------------------------------------------------
# Part 1: the first layer's filters and feature maps.


def edge_probes(size: int, lo: float, hi: float, n: int = N_DIRECTIONS) -> np.ndarray:
    """`n` step-edge images [n, size, size, 1], brightness rising towards direction k*360/n.

    Direction 0 degrees: dark on the left, bright on the right (a vertical edge line);
    90 degrees: bright at the top (a horizontal edge line). `lo`/`hi` are the normalised
    values of background and ink, so the probes look to the network like the digits do.
    """
    centre = (size - 1) / 2
    rows, cols = np.mgrid[0:size, 0:size]
    x, y = cols - centre, centre - rows  # y up, as a reader thinks of angles
    probes = []
    for k in range(n):
        theta = 2 * math.pi * k / n
        side = x * math.cos(theta) + y * math.sin(theta)
        probes.append(np.where(side > 0, hi, lo))
    return np.stack(probes)[..., None].astype(np.float32)


def edge_kind(direction_deg: float) -> str:
    """The nearest of horizontal / diagonal / vertical for the edge line of a gradient."""
    line = (direction_deg + 90) % 180  # the edge line is perpendicular to the gradient
    if min(line, 180 - line) < 22.5:
        return "horizontal edge"
    if abs(line - 90) < 22.5:
        return "vertical edge"
    return "diagonal edge"


EDGE_GAIN = 2.0  # an edge excites a pure edge detector at least twice as much as flat input


def tuning(responses: np.ndarray, dark: np.ndarray, ink: np.ndarray) -> list[dict[str, Any]]:
    """Per filter: preferred direction, orientation selectivity, edge gain, what else it sees.

    `responses[k, f]` is filter f's strongest response to probe k (direction k*360/K),
    `dark[f]`/`ink[f]` its response to a uniform background / ink image. A probe holds both
    uniform regions, so only the excess E = response - max(dark, ink) says what the edge
    adds. The orientation selectivity (E_pref - E_orth) / (E_pref + E_orth) is 0 for a
    filter indifferent to orientation and 1 for one that answers a single orientation; the
    edge gain R_pref / max(dark, ink) says how much more an edge excites the filter than
    flat input does. Below EDGE_GAIN the filter is named after the flat input it also
    answers ("ink + ...", "background + ...").
    """
    n = responses.shape[0]
    uniform = np.maximum(dark, ink)
    excess = np.maximum(responses - uniform[None, :], 0.0)
    out = []
    for f in range(responses.shape[1]):
        e = excess[:, f]
        k = int(np.argmax(e))
        orth = max(e[(k + n // 4) % n], e[(k - n // 4) % n])
        pref = float(e[k])
        direction = 360.0 * k / n
        gain = float(responses[k, f] / uniform[f]) if uniform[f] > 0 else math.inf
        kind = edge_kind(direction) if pref > 0 else "no edge"
        if gain < EDGE_GAIN:
            kind = f"{'background' if dark[f] > ink[f] else 'ink'} + {kind}"
        out.append(
            {
                "direction_deg": direction,
                "kind": kind,
                "selectivity": float((pref - orth) / (pref + orth)) if pref > 0 else 0.0,
                "edge_gain": gain,
                "flat_dark": float(dark[f]),
                "flat_ink": float(ink[f]),
                "excess": e.tolist(),
            }
        )
    return out


def map_correlations(maps: np.ndarray) -> np.ndarray:
    """Correlation between every two filters' feature maps [N, H, W, F] over all positions."""
    flat = maps.reshape(-1, maps.shape[-1]).astype(np.float64)
    flat = flat - flat.mean(0)
    norms = np.linalg.norm(flat, axis=0)
    norms[norms == 0] = 1.0
    flat = flat / norms
    return flat.T @ flat


def lenet_apply(model) -> Callable:
    """A jitted (variables, images) -> (output of C1, output of C3), each after its ReLU,
    taken as the report takes feature maps (`flaxcnn.report.tap`)."""
    import jax

    forward = report.tap(model, [FIRST_CONV, SECOND_CONV])

    @jax.jit
    def apply(variables, images):
        maps = forward(variables, images)[1]
        return maps[FIRST_CONV], maps[SECOND_CONV]

    return apply


def measure_filters(run: harness.Run, settings: Settings) -> dict[str, Any]:
    """Train LeNet-5 on the digits; its filters, their tuning, one image's feature maps."""
    print(f"part 1: {FILTER_ARCH} on digits, {settings.filter_epochs} epoch(s)")
    size = 32
    model, variables, metrics = train_and_restore(
        run, FILTER_ARCH, "digits", size, settings.filter_epochs
    )
    dataset = load_dataset("digits", run.data_dir)
    from flaxcnn import models

    channels = models.get_spec(FILTER_ARCH).in_channels
    test_images, test_labels = report.first_test_images(
        dataset, size, channels, dataset.info.num_test
    )
    lo, hi = float(test_images.min()), float(test_images.max())
    probes = edge_probes(size, lo, hi)
    flats = np.stack([np.full((size, size, 1), lo), np.full((size, size, 1), hi)])

    _, fresh = init_variables(FILTER_ARCH, dataset.info.num_classes, size, channels)
    apply = lenet_apply(model)
    result: dict[str, Any] = {}
    # Probes, flat images and the test split in one call: one compilation, not three.
    everything = np.concatenate([probes, flats.astype(np.float32), test_images])
    cut = [len(probes), len(probes) + len(flats)]
    for label, v in (("trained", variables), ("init", fresh)):
        c1_maps, c3_maps = (np.asarray(m) for m in apply(v, everything))
        probe_maps, flat_maps, maps = np.split(c1_maps, cut)
        corr = map_correlations(maps)
        off = np.abs(corr[~np.eye(corr.shape[0], dtype=bool)])
        responses = probe_maps.max(axis=(1, 2))  # [direction, filter]
        result[label] = {
            "tuning": tuning(responses, *flat_maps.max(axis=(1, 2))),
            "responses": responses.tolist(),
            "map_correlation": corr.tolist(),
            "mean_abs_correlation": float(off.mean()),
            "max_abs_correlation": float(off.max()),
        }
        if label == "trained":
            c1, c3 = maps[:1], c3_maps[cut[1] : cut[1] + 1]
    kernels = report.filters(variables, report.anatomy(model, (1, size, size, channels)).first_conv)
    result.update(
        arch=FILTER_ARCH,
        image_size=size,
        epochs=settings.filter_epochs,
        test_accuracy=float(metrics.get("accuracy", math.nan)),
        test_images=len(test_images),
        filters=kernels[..., 0].tolist(),  # [filter, 5, 5]
        example={
            "label": int(test_labels[0]),
            "image": np.asarray(test_images[0, :, :, 0]).tolist(),
            FIRST_CONV: np.asarray(c1[0]).transpose(2, 0, 1).tolist(),
            SECOND_CONV: np.asarray(c3[0]).transpose(2, 0, 1).tolist(),
        },
    )
    return result


# ---------------------------------------------------------------------------------------
# Part 2: contrast and gradient through plain and residual stacks.


def pooled(statistic: Callable, a):
    """A per-image statistic of `flaxcnn.report` over a whole batch [N, H, W, C]: the images
    as the channels of one image."""
    n, h, w, c = a.shape
    return statistic(a.transpose(1, 2, 0, 3).reshape(1, h, w, n * c))[0]


def spatial_contrast(a):
    """Std over spatial positions, averaged over images and channels ([N, H, W, C] -> scalar)."""
    return pooled(report.spatial_contrast, a)


def spatial_share(a):
    """sqrt(spatial variance / mean square): 0 for a uniform map, whatever its scale."""
    return pooled(report.spatial_share, a)


def block_order(names: Sequence[str]) -> list[str]:
    """Residual blocks `layer{stage}_{index}` in the order the data flows through them."""
    found = [(int(m.group(1)), int(m.group(2)), n) for n in names if (m := BLOCK_NAME.match(n))]
    return [n for _, _, n in sorted(found)]


def blocks_in(depth: int) -> int:
    """He et al.'s 6n+2 layers: 3 stages of n two-conv blocks."""
    return 3 * ((depth - 2) // 6)


def kernel_norm(tree) -> Any:
    """The Euclidean norm of every conv `kernel` leaf in a parameter subtree."""
    import jax
    import jax.numpy as jnp

    leaves = [
        leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if getattr(path[-1], "key", None) == "kernel"
    ]
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in leaves))


def make_probe(model) -> Callable:
    """(variables, images, labels) -> per-block statistics, for both BatchNorm modes.

    For each mode: `contrast` and `share` of each block's output, in data-flow order;
    `grad` the gradient norm of the mean cross-entropy for the stem conv (index 0) and for
    each block's two conv kernels together (index 1..B); `maps` the first image's
    channel-averaged output of every block; `input_contrast` the images' own contrast.
    """
    import jax

    from flaxcnn import losses
    from flaxcnn.models.resnet import BasicBlock

    def wanted(module, method: str) -> bool:
        return method == "__call__" and isinstance(module, BasicBlock)

    def loss(params, batch_stats, images, labels, train: bool):
        mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
        logits, state = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=train,
            capture_intermediates=wanted,
            mutable=mutable,
        )
        inter = state["intermediates"]
        outputs = [inter[name]["__call__"][0] for name in block_order(list(inter))]
        return losses.cross_entropy(logits, labels), outputs

    def probe(variables, images, labels):
        result = {"input_contrast": spatial_contrast(images), "input_share": spatial_share(images)}
        for mode in BN_MODES:
            grad_fn = jax.value_and_grad(loss, has_aux=True)
            (value, outputs), grads = grad_fn(
                variables["params"], variables["batch_stats"], images, labels, mode == "batch"
            )
            blocks = block_order(list(grads))
            result[mode] = {
                "loss": value,
                "contrast": [spatial_contrast(a) for a in outputs],
                "share": [spatial_share(a) for a in outputs],
                "grad": [kernel_norm(grads["conv1"])] + [kernel_norm(grads[b]) for b in blocks],
                "maps": [a[0].mean(-1) for a in outputs],
            }
        return result

    return jax.jit(probe)


def summarise(raw: dict, depth: int) -> dict[str, Any]:
    """Host floats; contrast relative to the input's; headline ratios."""
    base = float(raw["input_contrast"])
    out: dict[str, Any] = {"input_contrast": base, "input_share": float(raw["input_share"])}
    for mode in BN_MODES:
        r = raw[mode]
        contrast = [float(c) / base for c in r["contrast"]]
        grad = [float(g) for g in r["grad"]]
        out[mode] = {
            "loss": float(r["loss"]),
            "contrast": contrast,
            "share": [float(s) for s in r["share"]],
            "grad": grad,
            "first_layer_grad": grad[0],
            "last_over_first": contrast[-1] / contrast[0] if contrast[0] > 0 else math.inf,
            "maps": [np.asarray(m).tolist() for m in map_picks(r["maps"], depth)],
        }
    return out


def picked_blocks(depth: int) -> list[int]:
    """The blocks whose maps the page shows: the first, the end of each stage."""
    n = blocks_in(depth) // 3
    return [0, n - 1, 2 * n - 1, 3 * n - 1]


def map_picks(maps: Sequence, depth: int) -> list:
    return [maps[i] for i in picked_blocks(depth)]


def measure_depth(run: harness.Run, settings: Settings) -> dict[str, Any]:
    """Every plain/residual net at init and (where set) after training."""
    dataset = load_dataset(settings.depth_dataset, run.data_dir)
    size, classes = settings.depth_image_size, dataset.info.num_classes
    images, labels = report.first_test_images(dataset, size, 3, settings.probe_batch)
    nets: dict[str, Any] = {}
    for depth in settings.depths:
        for family in FAMILIES:
            arch = f"{family}{depth}"
            print(f"part 2: {arch} at init")
            model, fresh = init_variables(arch, classes, size, 3)
            # compiled once, used at init and after training
            probe = compile_run_once(make_probe(model), fresh, images, labels)
            entry: dict[str, Any] = {
                "family": family,
                "depth": depth,
                "blocks": blocks_in(depth),
                "init": summarise(probe(fresh, images, labels), depth),
                "trained": None,
                "test_accuracy": None,
            }
            if depth in settings.trained_depths and settings.depth_epochs > 0:
                print(f"part 2: training {arch}, {settings.depth_epochs} epoch(s)")
                _, variables, metrics = train_and_restore(
                    run,
                    arch,
                    settings.depth_dataset,
                    size,
                    settings.depth_epochs,
                    settings.depth_batch,
                )
                trained = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
                entry["trained"] = summarise(probe(trained, images, labels), depth)
                entry["test_accuracy"] = float(metrics.get("accuracy", math.nan))
            nets[arch] = entry
    return {
        "dataset": settings.depth_dataset,
        "num_classes": classes,
        "image_size": size,
        "epochs": settings.depth_epochs,
        "batch_size": settings.depth_batch,
        "probe_batch": len(images),
        "depths": list(settings.depths),
        "trained_depths": [d for d in settings.trained_depths if settings.depth_epochs > 0],
        "picked_blocks": {str(d): picked_blocks(d) for d in settings.depths},
        "example_image": images[0].mean(-1).tolist(),
        "nets": nets,
    }


# ---------------------------------------------------------------------------------------
# Figures.


def draw_filters(filters: dict) -> Any:
    """The six learned 5x5 filters, each titled with its preferred edge, and their tuning."""
    kernels = np.asarray(filters["filters"])
    tun = filters["trained"]["tuning"]
    n = len(kernels)
    figure = harness.new_figure(2.0 * n, 5.2)
    grid = figure.add_gridspec(2, n, height_ratios=[1, 1.1])
    limit = float(np.abs(kernels).max()) or 1.0
    for f in range(n):
        ax = figure.add_subplot(grid[0, f])
        ax.imshow(kernels[f], cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_xticks([])
        ax.set_yticks([])
        t = tun[f]
        ax.set_title(
            f"filter {f + 1}\n{t['kind']}\n{t['direction_deg']:.0f}°, OSI {t['selectivity']:.2f}",
            fontsize=8,
        )
    ax = figure.add_subplot(grid[1, :])
    directions = 360.0 * np.arange(N_DIRECTIONS) / N_DIRECTIONS
    for f in range(n):
        e = np.asarray(tun[f]["excess"])
        ax.plot(directions, e / max(e.max(), 1e-12), marker="o", ms=3, label=f"filter {f + 1}")
    ax.set_xlabel("direction in which the step edge gets brighter (degrees; 0 = to the right)")
    ax.set_ylabel("edge response above\nflat brightness (of max)")
    ax.set_xticks(range(0, 360, 45))
    ax.legend(fontsize=7, ncol=n, loc="upper center", bbox_to_anchor=(0.5, -0.28))
    ax.grid(alpha=0.3)
    figure.suptitle(
        f"{filters['arch']} first-layer filters after {filters['epochs']} epoch(s) on digits "
        "(red: positive weight, blue: negative)",
        fontsize=10,
    )
    return figure


def draw_maps(filters: dict) -> Any:
    """One test digit and its feature maps after C1 and C3 (all 6 and 16 channels), drawn
    as the report draws feature maps."""
    ex = filters["example"]
    maps = {name: np.asarray(ex[name]).transpose(1, 2, 0) for name in (FIRST_CONV, SECOND_CONV)}
    return report.feature_maps_figure(
        np.asarray(ex["image"]),
        maps,
        f"A test digit (a {ex['label']}) and its feature maps after C1 (5x5 conv + ReLU) and "
        "after C3, most varied channels first; bright = strong response",
    )


def line_style(family: str, depth: int, depths: Sequence[int]) -> dict[str, Any]:
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    return {
        "color": colours[list(depths).index(depth) % len(colours)],
        "linestyle": "-" if family == "resnet" else "--",
        "label": f"{family}{depth}",
    }


def log_axis(ax) -> None:
    """A log y axis labelled in plain numbers; 1-2-5 ticks when it spans under 2 decades."""
    from matplotlib import ticker

    ax.set_yscale("log")
    low, high = ax.get_ylim()
    if high / low < 100:
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))


def draw_curves(depth: dict, key: str, ylabel: str, start: int) -> Any:
    """A 2x2 grid (BatchNorm mode x init/trained) of per-block curves, one line per net."""
    figure = harness.new_figure(11, 7.5)
    axes = figure.subplots(2, 2, sharex=True)
    titles = {
        ("batch", "init"): "at initialisation, BatchNorm on batch statistics",
        ("batch", "trained"): "after training, BatchNorm on batch statistics",
        ("running", "init"): "at initialisation, BatchNorm = identity (no normalisation)",
        ("running", "trained"): "after training, BatchNorm on running statistics (inference)",
    }
    for i, mode in enumerate(BN_MODES):
        for j, state in enumerate(("init", "trained")):
            ax = axes[i][j]
            drawn = 0
            for arch, net in depth["nets"].items():
                if net[state] is None:
                    continue
                values = net[state][mode][key]
                style = line_style(net["family"], net["depth"], depth["depths"])
                if state == "trained" and learned(depth, arch) is False:
                    style["label"] += " (did not learn)"
                ax.plot(range(start, start + len(values)), values, **style)
                drawn += 1
            ax.set_title(titles[mode, state], fontsize=9)
            ax.grid(alpha=0.3, which="both")
            if drawn:
                log_axis(ax)
                ax.legend(fontsize=7, ncol=2)
            else:
                ax.text(0.5, 0.5, "not measured at this size", ha="center", transform=ax.transAxes)
            if i == 1:
                ax.set_xlabel(
                    "residual block (data-flow order)"
                    if start
                    else "layer: 0 = first conv, i = residual block i"
                )
            if j == 0:
                ax.set_ylabel(ylabel)
    return figure


def draw_deep_maps(depth: dict) -> Any:
    """First test image's channel-mean block outputs, plain vs residual, deepest nets."""
    rows = []
    for state in ("init", "trained"):
        measured = [d for d in depth["depths"] if depth["nets"][f"plain{d}"][state] is not None]
        if measured:
            d = max(measured)
            rows += [(f"{f}{d}", state) for f in FAMILIES]
    figure = harness.new_figure(11, 2.2 * len(rows) + 0.6)
    axes = np.atleast_2d(figure.subplots(len(rows), 5))
    for r, (arch, state) in enumerate(rows):
        net = depth["nets"][arch]
        picks = depth["picked_blocks"][str(net["depth"])]
        mode = net[state]["batch"]
        ax = axes[r][0]
        ax.imshow(np.asarray(depth["example_image"]), cmap="gray")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("input", fontsize=8)
        said = "did not learn" if learned(depth, arch) is False and state == "trained" else state
        ax.set_ylabel(f"{arch}\n{said}", fontsize=9)
        for c, block in enumerate(picks):
            ax = axes[r][c + 1]
            ax.imshow(np.asarray(mode["maps"][c]), cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"block {block + 1}: contrast {mode['contrast'][block]:.3g}", fontsize=8)
    figure.suptitle(
        "One test image after block 1 and the last block of stages 1, 2, 3 (channel mean, "
        "BatchNorm on batch statistics);\neach panel scaled to its own range; contrast = "
        "spatial std relative to the input's",
        fontsize=9,
    )
    return figure


# ---------------------------------------------------------------------------------------
# The page.


def fmt(value: float | None, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return harness.NOT_RUN
    return format(value, spec)


def depth_rows(depth: dict, mode: str) -> list[list[str]]:
    rows = []
    for arch, net in depth["nets"].items():
        init, trained = net["init"][mode], net["trained"] and net["trained"][mode]
        accuracy = fmt(net["test_accuracy"], ".3f")
        if learned(depth, arch) is False:
            accuracy += " (did not learn)"
        rows.append(
            [
                arch,
                str(net["blocks"]),
                accuracy,
                fmt(init["last_over_first"]),
                fmt(trained and trained["last_over_first"]),
                fmt(init["share"][-1], ".2f"),
                fmt(trained and trained["share"][-1], ".2f"),
                fmt(init["first_layer_grad"]),
                fmt(trained and trained["first_layer_grad"]),
            ]
        )
    return rows


DEPTH_HEADERS = [
    "net",
    "blocks",
    "test acc. after training",
    "contrast last block / first block (init)",
    "same (after training)",
    "spatial share, last block (init)",
    "same (after training)",
    "‖grad‖ first conv (init)",
    "same (after training)",
]
FADE = 0.1  # faded: the last block keeps under 10% of the first block's contrast
FLAT = 0.2  # uniform: spatial variation under 20% of the map's root mean square
GRAD_RATIO = 10.0  # a first-layer gradient 10x off the residual net's vanished / exploded
# A net "learned" when its test accuracy is at least 3x chance (1 / classes: 0.3 on the 10
# digits); one below that is described as "after training, did not learn", never "trained",
# and no verdict on trained nets rests on it.
LEARNED_TIMES_CHANCE = 3.0
GROWS = 100.0  # a residual net whose last block has 100x the first's contrast: "no bound"


def learned_threshold(depth: dict) -> float:
    return LEARNED_TIMES_CHANCE / depth["num_classes"]


def learned(depth: dict, arch: str) -> bool | None:
    """Whether `arch` clearly learned in its training (None: it was not trained)."""
    net = depth["nets"][arch]
    if net["trained"] is None or net.get("test_accuracy") is None:
        return None
    return net["test_accuracy"] >= learned_threshold(depth)


def not_learned(depth: dict) -> list[str]:
    """The trained nets that did not clearly learn."""
    return [arch for arch in depth["nets"] if learned(depth, arch) is False]


def fade_sentence(arch: str, m: dict) -> str:
    """What happened to the image in one net, from its numbers."""
    shrunk = m["last_over_first"] < FADE
    flat = m["share"][-1] < FLAT
    what = (
        "faded to an almost uniform map"
        if shrunk and flat
        else "faded to an almost uniform (near-constant) map in absolute terms, though what "
        "is left still varies over space relative to its own size"
        if shrunk
        else "became flat relative to its size"
        if flat
        else "lost some contrast but did not fade"
        if m["last_over_first"] < 1
        else "did not fade (its contrast grew)"
    )
    return (
        f"{arch} keeps {m['last_over_first']:.3g} of its first block's contrast at the last "
        f"block (spatial share {m['share'][-1]:.2f}): it {what}"
    )


def grad_ratio(p: dict, r: dict) -> float:
    """The plain net's first-layer gradient norm over the residual net's."""
    return p["first_layer_grad"] / r["first_layer_grad"] if r["first_layer_grad"] else math.inf


def grad_sentence(p: dict, r: dict) -> str:
    ratio = grad_ratio(p, r)
    trend = (
        "vanished in the plain net"
        if ratio < 1 / GRAD_RATIO
        else "exploded in the plain net (it did not vanish)"
        if ratio > GRAD_RATIO
        else "was of the same order in both"
    )
    return (
        f"first-layer gradient norm {p['first_layer_grad']:.3g} (plain) vs "
        f"{r['first_layer_grad']:.3g} (residual): it {trend}; from the last block back to "
        f"the first conv the gradient norm changes x{p['grad'][0] / p['grad'][-1]:.3g} in the "
        f"plain net, x{r['grad'][0] / r['grad'][-1]:.3g} in the residual one"
    )


SETTINGS_TEXT = {
    ("batch", "init"): "at init, BatchNorm on batch statistics (as trained)",
    ("batch", "trained"): "after training, BatchNorm on batch statistics",
    ("running", "init"): "at init without normalisation (BatchNorm at its initial statistics)",
    ("running", "trained"): "after training, BatchNorm on running statistics (inference)",
}


def depth_findings(depth: dict) -> list[dict[str, Any]]:
    """Per setting (BatchNorm mode x init/trained), the deepest measured pair and the verdicts.
    After training, only pairs of which both nets learned (`learned`) count as trained."""
    found = []
    for mode in BN_MODES:
        for state in ("init", "trained"):
            pairs = [
                d
                for d in depth["depths"]
                if depth["nets"][f"plain{d}"][state]
                and depth["nets"][f"resnet{d}"][state]
                and (
                    state == "init"
                    or (learned(depth, f"plain{d}") and learned(depth, f"resnet{d}"))
                )
            ]
            if not pairs:
                continue
            d = max(pairs)
            p = depth["nets"][f"plain{d}"][state][mode]
            r = depth["nets"][f"resnet{d}"][state][mode]
            found.append(
                {
                    "mode": mode,
                    "state": state,
                    "depth": d,
                    "plain": p,
                    "resnet": r,
                    "fade_held": p["last_over_first"] < FADE <= r["last_over_first"],
                    "grad_held": grad_ratio(p, r) < 1 / GRAD_RATIO,
                }
            )
    return found


def held(flag: bool) -> str:
    return "held" if flag else "did NOT hold"


def depth_verdict(depth: dict) -> list[str]:
    """Plain sentences on the second claim, from the numbers only (deepest pair measured;
    after training, the deepest pair of which both nets learned)."""
    lines = []
    findings = depth_findings(depth)
    for f in findings:
        d, p, r = f["depth"], f["plain"], f["resnet"]
        lines.append(
            f"- **{SETTINGS_TEXT[f['mode'], f['state']]}:** {fade_sentence(f'plain{d}', p)}; "
            f"{fade_sentence(f'resnet{d}', r)}; {grad_sentence(p, r)}. The fading part of the "
            f"claim {held(f['fade_held'])} here, the gradient part {held(f['grad_held'])}."
        )
    failed = not_learned(depth)
    if failed:
        pairs = [d for d in depth["depths"] if f"plain{d}" in failed or f"resnet{d}" in failed]
        measured = any(f["state"] == "trained" for f in findings)
        lines.append(
            f"- **after training:** {' and '.join(failed)} did not learn (test accuracy under "
            f"{learned_threshold(depth):.2g}, {LEARNED_TIMES_CHANCE:g}x chance), so the "
            f"{', '.join(map(str, pairs))}-layer pair{'s are' if len(pairs) > 1 else ' is'} "
            "left out of the verdict on trained nets"
            + ("." if measured else "; no pair of which both nets learned is left to judge.")
        )
    return lines


def depth_summary(depth: dict) -> str:
    """One paragraph: in which settings each half of the claim held."""
    found = depth_findings(depth)

    def where(key: str, value: bool) -> str:
        names = [SETTINGS_TEXT[f["mode"], f["state"]] for f in found if f[key] == value]
        return "; ".join(names) or "none"

    return (
        f"**Verdict, as measured.** The image faded (last block under {FADE:g} of the first "
        f"block's contrast) in the plain net and not in the residual one in: "
        f"{where('fade_held', True)}. It did not in: {where('fade_held', False)}. The "
        f"first-layer gradient of the plain net was under 1/{GRAD_RATIO:g} of the residual "
        f"net's in: {where('grad_held', True)}; not in: {where('grad_held', False)}."
    )


def accuracy_note(depth: dict) -> str:
    """Say how far the short training got, so 'trained' is read for what it is: a net under
    `LEARNED_TIMES_CHANCE` x chance did not learn and is never called trained."""
    trained = {a: n["test_accuracy"] for a, n in depth["nets"].items() if n["trained"]}
    if not trained:
        return "Nothing was trained in part 2 at this size; the trained panels are empty."
    listed = ", ".join(f"{a} {acc:.3f}" for a, acc in trained.items())
    chance = 1 / depth["num_classes"]
    failed = not_learned(depth)
    return (
        f"Test accuracy after {depth['epochs']} epochs: {listed} (chance is {chance:.2g}; a "
        f"net counts as having learned at {learned_threshold(depth):.2g}, "
        f"{LEARNED_TIMES_CHANCE:g}x chance, or more). "
        + (
            f"{' and '.join(failed)} did not learn: its 'after training' numbers describe a "
            f"network after {depth['epochs']} epochs of training that did not learn, not a "
            "trained one (the --full run trains longer), and no verdict on trained nets "
            "below rests on them."
            if failed
            else "Every trained net learned."
        )
    )


def likely_reason(depth: dict) -> str | None:
    """The mechanism that would explain the numbers at initialisation, each half only when
    the numbers show what it explains (None when neither does): BatchNorm (batch statistics)
    keeping the deep plain net's signal while its gradient explodes; without normalisation,
    the plain net fading while the residual one keeps (or grows) its signal."""
    found = {(f["mode"], f["state"]): f for f in depth_findings(depth)}
    parts = []
    bn = found.get(("batch", "init"))
    if bn is not None:
        d, p, r = bn["depth"], bn["plain"], bn["resnet"]
        kept = p["last_over_first"] >= FADE
        exploded = grad_ratio(p, r) > GRAD_RATIO
        if kept or exploded:
            parts.append(
                "BatchNorm re-scales every block's output to unit variance over the batch and "
                "positions"
                + (
                    f", so in the nets as they train the signal cannot shrink towards zero "
                    f"(plain{d} kept {p['last_over_first']:.2g} of its first block's contrast)"
                    if kept
                    else ""
                )
                + (
                    f"{', and' if kept else ';'} its backward pass multiplies the gradient "
                    f"instead (plain{d}'s first-layer gradient was {grad_ratio(p, r):.3g}x the "
                    "residual net's: gradient explosion at initialisation in deep plain "
                    "BatchNorm nets, as Yang et al. 2019 describe)"
                    if exploded
                    else ""
                )
                + "."
            )
    raw = found.get(("running", "init"))
    if raw is not None and raw["fade_held"]:
        d, p, r = raw["depth"], raw["plain"], raw["resnet"]
        grows = r["last_over_first"] >= 1
        parts.append(
            "Without normalisation, each plain block shrinks the image a little and a deep "
            f"stack of them leaves almost nothing (plain{d}: {p['last_over_first']:.2g} of the "
            "first block's contrast)"
            + (
                ", while an identity shortcut adds each block's output to its input, so the "
                "signal"
                + (" (and the gradient)" if raw["grad_held"] else "")
                + " can only accumulate"
                + (
                    f", here to the point of growing without bound (resnet{d}: "
                    f"{r['last_over_first']:.2g}x)"
                    if r["last_over_first"] >= GROWS
                    else f" (resnet{d}: {r['last_over_first']:.2g}x)"
                )
                if grows
                else ""
            )
            + "."
        )
    if not parts:
        return None
    return "A likely reason (the mechanism itself is not measured here): " + " ".join(parts)


def filters_verdict(filters: dict) -> str:
    """The first claim, in words, from the numbers only."""
    t, i = filters["trained"], filters["init"]
    kinds = [x["kind"] for x in t["tuning"]]
    counts = ", ".join(f"{kinds.count(k)} x {k}" for k in sorted(set(kinds)))
    corr = np.abs(np.asarray(t["map_correlation"]))
    twins = [
        f"{a + 1} and {b + 1}"
        for a in range(len(corr))
        for b in range(a + 1, len(corr))
        if corr[a, b] > 0.9
    ]
    missing = [
        k
        for k in ("horizontal edge", "vertical edge", "diagonal edge")
        if not any(x.endswith(k) for x in kinds)
    ]
    osi_t = np.mean([x["selectivity"] for x in t["tuning"]])
    osi_i = np.mean([x["selectivity"] for x in i["tuning"]])
    measured = (
        f"**As measured:** the six trained filters are {counts}. Mean orientation "
        f"selectivity {osi_t:.2f} trained vs {osi_i:.2f} for the random filters at init; "
        f"mean |correlation| between two filters' maps {t['mean_abs_correlation']:.2f} "
        f"trained vs {i['mean_abs_correlation']:.2f} at init. "
        + (
            f"Not every filter has a feature of its own: filters {', '.join(twins)} give "
            "maps correlated above 0.9 (the same feature twice). "
            if twins
            else "No two filters' maps are correlated above 0.9. "
        )
        + (f"No filter is a {' or '.join(missing)} detector. " if missing else "")
    )
    if osi_t <= osi_i:
        return measured + (
            "Training did not make the filters more orientation-selective than random "
            "ones: the claim did not show here."
        )
    return measured + (
        "So the claim held in part: the first layer splits the image into oriented edge "
        "(and ink/background) maps, "
        + (
            "but not every filter found a feature of its own, "
            if twins
            else "each filter with a feature of its own, "
        )
        + "and colour could not be tested."
    )


def filter_rows(filters: dict) -> list[list[str]]:
    rows = []
    for f, (t, i) in enumerate(
        zip(filters["trained"]["tuning"], filters["init"]["tuning"], strict=True)
    ):
        rows.append(
            [
                str(f + 1),
                t["kind"],
                f"{t['direction_deg']:.1f}",
                f"{t['selectivity']:.2f}",
                fmt(t["edge_gain"], ".2f"),
                f"{i['selectivity']:.2f}",
                fmt(i["edge_gain"], ".2f"),
            ]
        )
    return rows


def rounded(obj: Any, digits: int = 4) -> Any:
    """Floats to `digits` significant digits, recursively: the record stays readable."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [rounded(v, digits) for v in obj]
    return obj


def json_record(settings: Settings, filters: dict, depth: dict) -> dict[str, Any]:
    """What NAME.json keeps: every number on the page, not the pixels of the figures."""
    slim_filters = {k: v for k, v in filters.items() if k != "example"}
    slim_filters["example_label"] = filters["example"]["label"]
    nets = {}
    for arch, net in depth["nets"].items():
        nets[arch] = dict(net)
        for state in ("init", "trained"):
            if net[state] is not None:
                nets[arch][state] = {
                    k: ({m: x for m, x in v.items() if m != "maps"} if k in BN_MODES else v)
                    for k, v in net[state].items()
                }
    slim_depth = {k: v for k, v in depth.items() if k not in ("nets", "example_image")}
    slim_depth["nets"] = nets
    return rounded(
        {"settings": dataclasses.asdict(settings), "filters": slim_filters, "depth": slim_depth}
    )


def input_share(depth: dict) -> float:
    return next(iter(depth["nets"].values()))["init"]["input_share"]


def write_page(run: harness.Run, settings: Settings, filters: dict, depth: dict) -> None:
    page = harness.Page(
        run,
        "What the layers see",
        claim="Each filter of a convolution picks out its own feature (horizontal edge, "
        "vertical edge, colour, shape). In a very deep plain stack the image fades, after "
        "enough convolutions, to an almost uniform map, while residual connections keep it "
        "(and keep the gradient flowing to the first layer).",
    )
    page.heading("1. The first layer's filters (LeNet-5 on digits)")
    page.text(
        f"Network: `{filters['arch']}`, trained {filters['epochs']} epoch(s) on the embedded "
        f"digits at 32x32 with `flaxcnn.training.train` (test accuracy "
        f"{filters['test_accuracy']:.3f}). LeNet-5 was chosen because its first layer has "
        "5x5 filters applied straight to the pixels: large enough to see an edge in, where "
        "resnet20's 3x3 filters are nine numbers each. The digits are grayscale (8x8, "
        "upsampled to 32x32; LeNet-5 reads one channel), so **no colour filter can be learned "
        "here**; the colour part of the claim is not tested."
    )
    page.text(
        f"Each filter was shown step edges in {N_DIRECTIONS} directions (from the digits' "
        "background level to their ink level); its response to one is the strongest value "
        "in its C1 map (after the ReLU). Direction = where the edge gets brighter (0° = to "
        "the right, a vertical edge line; 90° = upwards, a horizontal edge line); the kind is "
        "the nearest of horizontal/diagonal/vertical. OSI = orientation selectivity "
        "(E_pref - E_orth)/(E_pref + E_orth) on the excess E of the edge response over the "
        "response to flat input: 0 = indifferent to orientation, 1 = one orientation only. "
        f"Edge gain = strongest edge response / response to a uniform background or ink "
        f"image; under {EDGE_GAIN:g} the filter is also named after the flat input it answers "
        "(ink or background). The same quantities for the same network at initialisation "
        "(random filters) are the control."
    )
    page.table(
        [
            "filter",
            "detects (trained)",
            "direction (°)",
            "OSI trained",
            "edge gain trained",
            "OSI at init",
            "edge gain at init",
        ],
        filter_rows(filters),
    )
    t, i = filters["trained"], filters["init"]
    page.text(
        "How alike are the six C1 feature maps (correlation over all "
        f"{filters['test_images']} test digits and positions)? Mean |correlation| between "
        f"two filters' maps: {t['mean_abs_correlation']:.2f} trained "
        f"({i['mean_abs_correlation']:.2f} at init), largest "
        f"{t['max_abs_correlation']:.2f} ({i['max_abs_correlation']:.2f} at init)."
    )
    page.figure(
        harness.save_figure(draw_filters(filters), run.path("-filters.png")),
        "Top: the six learned 5x5 filters of C1 (red positive, blue negative weights), with "
        "the edge each answers most. Bottom: how much more each filter answers a step edge "
        "than flat brightness, against the edge's direction, scaled to its own maximum.",
    )
    page.figure(
        harness.save_figure(draw_maps(filters), run.path("-maps.png")),
        "One test digit and its feature maps after the first conv layer (C1) and after the "
        "second (C3): each map lights up where its filter's feature is.",
    )
    page.text(filters_verdict(filters))

    page.heading("2. Contrast and gradient through plain and residual stacks")
    trained_text = (
        f"trained {depth['epochs']} epochs in batches of {depth['batch_size']} with the "
        "trainer's defaults otherwise (SGD with Nesterov momentum, lr 0.1 per 256 images, "
        "cosine schedule, 1 warm-up epoch, weight decay 5e-4) for "
        f"depths {', '.join(map(str, depth['trained_depths']))}"
        if depth["trained_depths"]
        else "not trained at this size (smoke: nothing is trained in part 2)"
    )
    untrained = [d for d in depth["depths"] if d not in depth["trained_depths"]]
    if not depth["trained_depths"]:
        untrained = []
    page.text(
        f"Data: {depth['dataset']} at {depth['image_size']}x{depth['image_size']}, one batch "
        f"of {depth['probe_batch']} real test images. Networks: plainN / resnetN (He et al.'s "
        f"CIFAR nets, 3 stages of (N-2)/6 two-conv blocks), {trained_text}"
        + (
            f"; depth {', '.join(map(str, untrained))} measured at initialisation only "
            "(training it costs too much on a 2-core CPU; its trained cells are empty)"
            if untrained
            else ""
        )
        + ". Contrast = std over spatial positions of a block's output, averaged over channels "
        "and images, divided by the same quantity for the input images; 'last block / first "
        "block' is that contrast at the last residual block over the first's. Spatial share = "
        "sqrt(spatial variance / mean square) of a block's output: 0 for a uniform map "
        f"whatever its scale (the input images': {input_share(depth):.2f}). Gradient = norm of the "
        "mean cross-entropy's gradient w.r.t. the first conv layer's kernel (and, in the "
        "curves, each block's two conv kernels). BatchNorm mode: on batch statistics is what "
        "the network computes in training; on running statistics is inference, and at "
        "initialisation (running mean 0, variance 1) it makes BatchNorm the identity, i.e. the "
        "same stack without normalisation. The 'init' networks are fresh seed-0 "
        "initialisations."
    )
    page.text("**BatchNorm on batch statistics (as in training):**")
    page.table(DEPTH_HEADERS, depth_rows(depth, "batch"))
    page.text("**BatchNorm on running statistics (init: no normalisation; trained: inference):**")
    page.table(DEPTH_HEADERS, depth_rows(depth, "running"))
    page.figure(
        harness.save_figure(
            draw_curves(depth, "contrast", "spatial contrast / input's", 1),
            run.path("-contrast.png"),
        ),
        "Spatial contrast of every residual block's output relative to the input's (log "
        "scale), plain (dashed) vs residual (solid), init (left) vs trained (right), "
        "BatchNorm on batch statistics (top) and on running statistics (bottom).",
    )
    page.figure(
        harness.save_figure(
            draw_curves(depth, "grad", "‖∂loss/∂kernel‖ (0 = first conv)", 0),
            run.path("-grad.png"),
        ),
        "Gradient norm reaching each layer's conv kernels (index 0: the first conv layer; "
        "i: block i's two convs), log scale, same panels as above.",
    )
    page.figure(
        harness.save_figure(draw_deep_maps(depth), run.path("-deep.png")),
        "What the deep blocks see: the channel-mean output of blocks 1 and the last of each "
        "stage for one test digit, deepest plain vs residual net.",
    )
    page.text(accuracy_note(depth))
    page.text(
        "**As measured** (deepest pair measured in each setting; after training, the deepest "
        "pair of which both nets learned):\n\n" + "\n".join(depth_verdict(depth))
    )
    page.text(depth_summary(depth))
    reason = likely_reason(depth)
    if reason:
        page.text(reason)

    page.heading("Full setting")
    page.text(
        "`python experiments/feature_maps.py --full` trains LeNet-5 for 30 epochs on digits and "
        "all six nets (depths 20/56/110) for 50 epochs on cifar10 at 32x32 (prepare cifar10 "
        "first; a GPU/TPU is advised). Not run here: its table stays empty until it is."
        if not run.full
        else "This page is the full run."
    )
    if not run.full:
        empty = [
            [f"{f}{d}", str(blocks_in(d))] + [harness.NOT_RUN] * (len(DEPTH_HEADERS) - 2)
            for d in (20, 56, 110)
            for f in FAMILIES
        ]
        page.table(DEPTH_HEADERS, empty)
    page.write(data=json_record(settings, filters, depth))


def main(argv: Sequence[str] | None = None) -> None:
    run = harness.start("feature_maps", __doc__, argv)
    settings = settings_for(run)
    load_dataset(settings.depth_dataset, run.data_dir)  # unprepared (cifar10)? say so first
    filters = measure_filters(run, settings)
    depth = measure_depth(run, settings)
    write_page(run, settings, filters, depth)


if __name__ == "__main__":
    harness.main_guard(main)
