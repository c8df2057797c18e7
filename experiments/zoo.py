"""The zoo: every registered architecture, its size, its cost and what it learns in a short run.

Claim (the course): the classic CNNs span more than three orders of magnitude in
parameters and multiply-adds, from LeNet-5 to VGG, and their cost (train-step speed)
follows; a bigger network is not automatically a better one: on a small problem (8x8
handwritten digits) a small network (at most 100,000 parameters: LeNet-5, simple_cnn)
learns as well as the giants.

Measured, for every name in `flaxcnn.models.names()` (or the `--arch` ones), all through
flaxcnn's public functions:
* at the registry's design point (its `input_size`, `in_channels`, `num_classes`):
  parameters and forward multiply-adds per image (`flaxcnn.models.summary`, under
  `jax.eval_shape`, nothing compiled), checked against the published counts in
  tests/reference/torchvision.json (torchvision, the course's own figures, He et al.'s
  rounded CIFAR counts) where one exists;
* on this machine, at the input the trainer picks for the digits (8x8 raised to each model's
  minimum; ResNet-18..152 use their small-input stem; `flaxcnn.models.resolve_input`):
  train and eval images per second and the train step's compile time from
  `flaxcnn.bench.benchmark` (synthetic data, the trainer's default optimizer);
* test accuracy on the digits after one fixed budget (the same epochs and batch for every
  network, every other setting the trainer's default), from `flaxcnn.training.train`.

Sizes:
* --smoke: simple_cnn and lenet5 at the design point and benched (1 timed step at batch
  8); lenet5 alone (at most 1 M multiply-adds) trained for 1 epoch of digits at batch 128
  (seconds; the test suite runs it).
* --quick: all 28 at the design point. Within cost limits at the digits input -- at most
  60 conv/dense layers (deeper nets' compiles take a minute or more each on 2 cores) and at
  most 300 M multiply-adds per image to be benched (batch 32, 3 timed steps), 50 M to be
  trained on the digits (4 epochs at batch 64): 18 benched (not the VGG-13/16/19 pairs,
  resnet101/152, resnet110, plain110) and 7 trained (simple_cnn, lenet5, googlenet,
  netresdeep, resnet18, resnet20, plain20). The others' cells stay empty. About 10-15
  minutes on a quiet 2-core laptop.
* --full: all 28 benched at their design input (batch 128, 20 timed steps, the design
  class count) on a GPU/TPU, and all 28 trained on the digits for the trainer's default 30
  epochs at batch 128 (writes zoo-full.*).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import harness
import jax
import numpy as np

from flaxcnn import bench, cli, data, models
from flaxcnn.models import summary
from flaxcnn.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "reference" / "torchvision.json"
DATASET = "digits"
SMOKE_ARCHS = ("simple_cnn", "lenet5")
# Families in the order the course meets them; an unknown family goes last, alphabetically.
FAMILY_ORDER = (
    "simple",
    "lenet",
    "alexnet",
    "vgg",
    "inception",
    "netresdeep",
    "resnet",
    "resnet_cifar",
    "plain_cifar",
)
FAMILY_COLORS = {
    "simple": "tab:gray",
    "lenet": "tab:brown",
    "alexnet": "tab:red",
    "vgg": "tab:purple",
    "inception": "tab:olive",
    "netresdeep": "tab:pink",
    "resnet": "tab:blue",
    "resnet_cifar": "tab:green",
    "plain_cifar": "tab:orange",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """One size's budget: what is benched and trained, and how much."""

    bench_at_design: bool  # True: the design input and class count; False: the digits input
    bench_batch: int
    bench_steps: int
    epochs: int
    train_batch: int
    # Cost limits at the digits input, None: no limit. Multiply-adds per image (millions)
    # set a step's cost; conv/dense layers (deep nets' compiles take a minute or more on 2
    # CPU cores) set the compile's.
    bench_max_mmacs: float | None
    train_max_mmacs: float | None
    max_layers: int | None


SETTINGS = {
    "smoke": Settings(False, 8, 1, 1, 128, None, 1.0, None),
    "quick": Settings(False, 32, 3, 4, 64, 300.0, 50.0, 60),
    "full": Settings(True, 128, 20, 30, 128, None, None, None),
}
SMALL_PARAMS = 100_000  # "a small network": LeNet-5 and simple_cnn, against the giants


# --- which networks, in which order ---------------------------------------------------------


def natural_key(name: str) -> list[Any]:
    """resnet20 < resnet110 and vgg11 < vgg11_bn < vgg13: numbers compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def sort_by_family(archs: Sequence[str]) -> list[str]:
    """The table's order: family (as the course meets them), then depth within a family."""

    def key(arch: str) -> tuple:
        family = models.get_spec(arch).family
        rank = FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)
        return rank, family, natural_key(arch)

    return sorted(archs, key=key)


def parse_archs(values: Sequence[str] | None, default: Sequence[str]) -> list[str]:
    """Repeated or comma-separated --arch names, checked against the registry (UsageError)."""
    if not values:
        return list(default)
    archs = [a.strip() for v in values for a in v.split(",") if a.strip()]
    known = set(models.names())
    for arch in archs:
        if arch not in known:
            try:
                models.get_spec(arch)  # its message names the close matches
            except ValueError as e:
                raise cli.UsageError(f"--arch: {e}") from None
    return list(dict.fromkeys(archs))


# --- the design point and the published counts ----------------------------------------------


def design_point(arch: str) -> dict[str, Any]:
    """Parameters and multiply-adds at the registry's design input and class count."""
    spec = models.get_spec(arch)
    model = models.create(arch, num_classes=spec.num_classes)
    shape = (1, spec.input_size, spec.input_size, spec.in_channels)
    return {
        "input_size": spec.input_size,
        "in_channels": spec.in_channels,
        "num_classes": spec.num_classes,
        "params": summary.count_params(model, shape),
        "macs": summary.total_macs(model, shape),
    }


def reference_params(arch: str, reference: dict[str, Any]) -> tuple[float, str] | None:
    """The published parameter count for `arch` at its design point, and where it is from.

    He et al.'s CIFAR counts are in millions, rounded; the others are exact.
    """
    if arch in reference["params"]:
        return reference["params"][arch], "torchvision"
    other = reference.get("other", {})
    for key, value in other.items():
        if key.startswith(f"{arch}_") and key.endswith("_params"):
            return value, "course"
    he = other.get("he2016_cifar10_params_millions", {})
    if arch in he:
        return he[arch], "He et al. 2016 (millions)"
    return None


def decimals(value: float) -> int:
    """The decimals a published number is given to: 0.27 -> 2, 1.7 -> 1."""
    text = repr(float(value)).rstrip("0").rstrip(".")
    return len(text.split(".")[1]) if "." in text else 0


def params_match(measured: int, published: float, source: str) -> bool:
    """Exact for exact counts; a count in millions matches when it rounds to the figure."""
    if "millions" in source:
        return round(measured / 1e6, decimals(published)) == published
    return measured == published


# --- the digits input, the benchmark, the training ------------------------------------------


def digits_input(arch: str, native: int) -> tuple[int, dict[str, Any]]:
    """The input side and model options the trainer picks for `native`-pixel images."""
    return models.resolve_input(models.get_spec(arch), native, None)


def digits_cost(arch: str, size: int, options: dict[str, Any], num_classes: int) -> dict:
    """Forward multiply-adds per image and conv/dense layers of the network the digits run
    trains: what the cost limits are held against. The per-layer table's rows add up to
    `summary.total_macs`."""
    spec = models.get_spec(arch)
    model = models.create(arch, num_classes=num_classes, **options)
    table = summary.layer_table(model, (1, size, size, spec.in_channels))
    return {
        "macs": sum(row.macs for row in table),
        "layers": sum(row.kind in ("Conv", "Dense") for row in table),
    }


def digits_model(arch: str, size: int, options: dict[str, Any], num_classes: int) -> dict:
    """Parameters, and `digits_cost`, of the network the digits run trains."""
    spec = models.get_spec(arch)
    model = models.create(arch, num_classes=num_classes, **options)
    params = summary.count_params(model, (1, size, size, spec.in_channels))
    return {"params": params, **digits_cost(arch, size, options, num_classes)}


def skip_reason(
    max_mmacs: float | None, max_layers: int | None, macs: int, layers: int
) -> str | None:
    """Why a size skips a network (None: it does not): over its cost limits."""
    reasons = []
    if max_mmacs is not None and macs > max_mmacs * 1e6:
        reasons.append(f"{macs / 1e6:.0f} M multiply-adds > {max_mmacs:g} M")
    if max_layers is not None and layers > max_layers:
        reasons.append(f"{layers} layers > {max_layers}")
    return ", ".join(reasons) or None


BENCH_KEYS = (
    "image_size",
    "in_channels",
    "model_options",
    "num_classes",
    "batch_size",
    "steps",
    "params",
    "macs_per_image",
    "init_sec",
    "train_compile_sec",
    "eval_compile_sec",
    "train_step_ms",
    "train_images_per_sec",
    "eval_images_per_sec",
)


def run_bench(arch: str, settings: Settings, digits_size: int, classes: int) -> dict[str, Any]:
    """`flaxcnn.bench.benchmark` at the design input (full) or the digits input (else)."""
    if settings.bench_at_design:
        spec = models.get_spec(arch)
        kwargs = {"image_size": None, "num_classes": spec.num_classes}
    else:
        kwargs = {"image_size": digits_size, "num_classes": classes}
    result = bench.benchmark(
        arch, batch_size=settings.bench_batch, steps=settings.bench_steps, **kwargs
    )
    return {k: result[k] for k in BENCH_KEYS}


def run_training(arch: str, settings: Settings, run: harness.Run) -> dict[str, Any]:
    """One digits run at the fixed budget; checkpoints are deleted after (VGG's are 1.5 GB)."""
    workdir = run.train_workdir(arch)
    lines: list[str] = []
    start = time.perf_counter()
    metrics = train(
        TrainConfig(
            arch=arch,
            dataset=DATASET,
            epochs=settings.epochs,
            batch_size=settings.train_batch,
            eval_every=settings.epochs,  # evaluate once, at the end
            checkpoint_every=10**9,  # one checkpoint, at the end
            keep_checkpoints=1,
            workdir=str(workdir),
            data_dir=run.data_dir,
            progress=False,
        ),
        out=lines.append,
    )
    wall = time.perf_counter() - start
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
    last = last_train_epoch(workdir / "metrics.jsonl")
    return {
        "epochs": settings.epochs,
        "batch_size": settings.train_batch,
        "accuracy": float(metrics["accuracy"]),
        "loss": float(metrics["loss"]),
        "final_train_loss": last.get("loss"),
        "final_train_accuracy": last.get("accuracy"),
        "wall_sec": wall,
        "log": lines,
    }


def last_train_epoch(path: Path) -> dict[str, Any]:
    """The trainer's record of the last training epoch (its metrics.jsonl)."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train_records = [r for r in records if r.get("split") == "train"]
    return train_records[-1] if train_records else {}


def measure(
    arch: str,
    settings: Settings,
    run: harness.Run,
    digits: tuple[int, int],
    reference: dict,
) -> dict[str, Any]:
    """Everything the zoo reports about one network; what a size skips stays None."""
    spec = models.get_spec(arch)
    native, num_classes = digits
    size, options = digits_input(arch, native)
    at_digits = digits_model(arch, size, options, num_classes)
    macs, layers = at_digits["macs"], at_digits["layers"]
    published = reference_params(arch, reference)
    design = design_point(arch)
    row: dict[str, Any] = {
        "arch": arch,
        "family": spec.family,
        "design": design,
        "reference": None,
        "digits_input": {"image_size": size, "in_channels": spec.in_channels, "options": options},
        "digits_params": at_digits["params"],
        "digits_macs": macs,
        "digits_layers": layers,
        "bench": None,
        "train": None,
    }
    if published is not None:
        value, source = published
        row["reference"] = {
            "params": value,
            "source": source,
            "match": params_match(design["params"], value, source),
        }
    row["published_gmacs"] = reference.get("gmacs", {}).get(arch)
    row["bench_skipped"] = skip_reason(settings.bench_max_mmacs, settings.max_layers, macs, layers)
    row["train_skipped"] = skip_reason(settings.train_max_mmacs, settings.max_layers, macs, layers)
    if row["bench_skipped"] is None:
        t0, c0 = time.perf_counter(), time.process_time()
        row["bench"] = run_bench(arch, settings, size, num_classes)
        row["bench"]["wall_sec"] = time.perf_counter() - t0
        row["bench"]["cpu_sec"] = time.process_time() - c0
    if row["train_skipped"] is None:
        c0 = time.process_time()
        row["train"] = run_training(arch, settings, run)
        row["train"]["cpu_sec"] = time.process_time() - c0
    return row


# --- the page -------------------------------------------------------------------------------


def fmt_int(value: int | None) -> str:
    return harness.cell(value, ",")


def input_text(size: int, channels: int, options: dict[str, Any] | None = None) -> str:
    return f"{size}x{size}x{channels}" + (" (small stem)" if options else "")


def published_text(ref: dict[str, Any]) -> str:
    return f"{ref['params']:g}M" if "millions" in ref["source"] else f"{ref['params']:,}"


def design_table(rows: Sequence[dict]) -> tuple[list[str], list[list[Any]]]:
    headers = ["family", "network", "design input", "classes", "params", "GMACs",
               "published params", "source", "match"]  # fmt: skip
    body = []
    for r in rows:
        d, ref = r["design"], r["reference"]
        body.append(
            [r["family"], r["arch"], input_text(d["input_size"], d["in_channels"]),
             d["num_classes"], fmt_int(d["params"]), f"{d['macs'] / 1e9:.3g}",
             None if ref is None else published_text(ref),
             None if ref is None else ref["source"],
             None if ref is None else ("yes" if ref["match"] else "NO")]
        )  # fmt: skip
    return headers, body


def machine_table(rows: Sequence[dict], settings: Settings) -> tuple[list[str], list[list]]:
    """Speed and accuracy; a cell this size did not measure stays empty."""
    headers = ["family", "network", "input", "params", "MMACs", "layers"]
    if settings.bench_at_design:
        headers += ["bench input (design)"]
    budget = f"{settings.epochs} ep, batch {settings.train_batch}"
    headers += ["train img/s", "eval img/s", "train compile s", f"digits test acc ({budget})"]
    body = []
    for r in rows:
        b, t, d = r["bench"], r["train"], r["digits_input"]
        row = [r["family"], r["arch"], input_text(d["image_size"], d["in_channels"], d["options"]),
               fmt_int(r["digits_params"]), f"{r['digits_macs'] / 1e6:.3g}",
               r["digits_layers"]]  # fmt: skip
        if settings.bench_at_design:
            row.append(None if b is None else input_text(b["image_size"], b["in_channels"]))
        row += [
            None if b is None else f"{b['train_images_per_sec']:,.0f}",
            None if b is None else f"{b['eval_images_per_sec']:,.0f}",
            None if b is None else f"{b['train_compile_sec']:.1f}",
            None if t is None else f"{t['accuracy']:.3f}",
        ]
        body.append(row)
    return headers, body


def full_not_run_table(archs: Sequence[str]) -> tuple[list[str], list[list[Any]]]:
    """The --full table, empty: it was not run here."""
    headers = ["network", "bench input (design)", "train img/s", "eval img/s",
               "train compile s", "digits test acc (30 ep, batch 128)"]  # fmt: skip
    body = []
    for arch in archs:
        spec = models.get_spec(arch)
        body.append([arch, input_text(spec.input_size, spec.in_channels), None, None, None, None])
    return headers, body


def family_color(family: str) -> str:
    return FAMILY_COLORS.get(family, "black")


def scatter(ax, points: Sequence[tuple[str, str, float, float]]) -> None:
    """Points coloured by family, one legend entry per family (labels: `place_labels`)."""
    seen: set[str] = set()
    for _, family, x, y in points:
        label = None if family in seen else family
        seen.add(family)
        ax.scatter([x], [y], color=family_color(family), s=28, label=label, zorder=3)


# Where a point's label may go, tried in this order: in rings of growing distance (points),
# each ring in 8 directions, right-above first. Beyond the first ring a thin leader line
# ties the label to its point.
LABEL_RINGS = (4, 10, 17, 26, 38, 52)
LABEL_DIRECTIONS = (  # (dx, dy, horizontal alignment, vertical alignment)
    (1, 1, "left", "bottom"),
    (1, -1, "left", "top"),
    (-1, 1, "right", "bottom"),
    (-1, -1, "right", "top"),
    (0, 1, "center", "bottom"),
    (0, -1, "center", "top"),
    (1, 0, "left", "center"),
    (-1, 0, "right", "center"),
)
LABEL_GAP = 1.5  # display pixels kept clear around every label
LEADER = {"arrowstyle": "-", "color": "0.45", "linewidth": 0.5, "shrinkA": 0, "shrinkB": 3}


def label_spots() -> list[tuple[tuple[float, float], str, str, bool]]:
    """(offset in points, ha, va, with a leader line) for every spot, nearest first."""
    spots = []
    for i, ring in enumerate(LABEL_RINGS):
        for dx, dy, ha, va in LABEL_DIRECTIONS:
            if dx and dy:
                offset = (dx * ring, dy * max(2, ring / 2))
            elif dy:
                offset = (0, dy * (ring + 2))
            else:
                offset = (dx * ring, 0)
            spots.append((offset, ha, va, i > 0))
    return spots


def overlap(box, others) -> float:
    """Display area that `box` shares with the boxes in `others`."""
    total = 0.0
    for other in others:
        w = min(box.x1, other.x1) - max(box.x0, other.x0)
        h = min(box.y1, other.y1) - max(box.y0, other.y0)
        total += max(w, 0.0) * max(h, 0.0)
    return total


def outside(box, frame) -> float:
    """Display area of `box` outside `frame`."""
    return box.width * box.height - overlap(box, [frame])


def text_box(text, renderer):
    """The display box of a label's text alone (an annotation's own box takes in its
    leader line)."""
    from matplotlib.text import Text

    text.update_positions(renderer)  # where its offset puts it now
    return Text.get_window_extent(text, renderer)


def place_labels(ax, points: Sequence[tuple[str, str, float, float]]) -> None:
    """Name every point: each label at the nearest spot around it (`label_spots`) that stays
    inside the axes, overlaps no other label (with `LABEL_GAP` to spare) and covers no
    point; failing that, where it breaks these least (another label or the frame first,
    a point last).

    Call after the figure is drawn once (layout and scales final); the labels stay out of
    the constrained layout, so they cannot move the points they were placed around.
    """
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    marks = []
    for _, _, x, y in points:
        px, py = ax.transData.transform((x, y))
        marks.append(Bbox.from_bounds(px - 5, py - 5, 10, 10))
    labels: list = []
    for arch, _, x, y in points:
        best = None
        for offset, ha, va, leader in label_spots():
            text = ax.annotate(arch, (x, y), xytext=offset, textcoords="offset points",
                               fontsize=7, ha=ha, va=va,
                               arrowprops=LEADER if leader else None)  # fmt: skip
            text.set_in_layout(False)
            box = text_box(text, renderer)
            cost = 1e6 * (overlap(box.padded(LABEL_GAP), labels) + outside(box, frame))
            cost += overlap(box, marks)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, text, box.padded(LABEL_GAP))
            else:
                text.remove()
            if cost == 0:
                break
        labels.append(best[2])


def figure(rows: Sequence[dict], settings: Settings):
    """Left: train throughput against cost; right: digits accuracy against cost."""
    fig = harness.new_figure(13, 5.6)
    left, right = fig.subplots(1, 2)
    benched = [r for r in rows if r["bench"] is not None]
    speed = [
        (r["arch"], r["family"], r["bench"]["macs_per_image"] / 1e6,
         r["bench"]["train_images_per_sec"])
        for r in benched
    ]  # fmt: skip
    scatter(left, speed)
    left.set_xscale("log")
    left.set_yscale("log")
    where = "design input" if settings.bench_at_design else "digits input"
    left.set_xlabel(f"forward multiply-adds per image at the {where} (millions, log scale)")
    left.set_ylabel("train images / second (log scale)")
    left.set_title(
        f"Train-step throughput, batch {settings.bench_batch}, {jax.devices()[0].platform}, {where}"
    )
    left.margins(0.1)
    left.grid(True, which="both", alpha=0.3)
    if benched:
        left.legend(fontsize=7, title="family", title_fontsize=8, loc="lower left")
    trained = [r for r in rows if r["train"] is not None]
    accuracy = [
        (r["arch"], r["family"], r["digits_macs"] / 1e6, r["train"]["accuracy"]) for r in trained
    ]
    scatter(right, accuracy)
    right.set_xscale("log")
    right.set_xlabel("forward multiply-adds per image at the digits input (millions, log scale)")
    right.set_ylabel("digits test accuracy")
    right.margins(x=0.12)
    right.set_ylim(0, 1.05)
    right.set_title(
        f"Digits test accuracy after {settings.epochs} epoch(s) at batch {settings.train_batch}"
    )
    right.grid(True, which="both", alpha=0.3)
    if trained:
        right.legend(fontsize=7, title="family", title_fontsize=8, loc="lower left")
    fig.canvas.draw()  # settle the constrained layout: display coordinates are now final
    place_labels(left, speed)
    place_labels(right, accuracy)
    return fig


def reference_sentence(rows: Sequence[dict]) -> str:
    """How many published counts match, and how close the multiply-adds are to torchvision's."""
    checked = [r for r in rows if r["reference"] is not None]
    if not checked:
        text = "None of these networks has a published parameter count in the reference file."
    else:
        bad = [r["arch"] for r in checked if not r["reference"]["match"]]
        text = f"{len(checked) - len(bad)} of {len(checked)} published parameter counts match"
        if bad:
            text += f"; these do NOT: {', '.join(bad)}."
        else:
            text += " (exact counts exactly, He et al.'s rounded millions to their rounding)."
    gmacs = [r for r in rows if r.get("published_gmacs")]
    if gmacs:
        error = {
            r["arch"]: abs(r["design"]["macs"] / 1e9 / r["published_gmacs"] - 1) for r in gmacs
        }
        worst = max(error, key=error.get)
        text += (
            f' The multiply-adds agree with torchvision\'s published "GFLOPS" (multiply-adds, '
            f"given to 3-4 digits) for the {len(gmacs)} networks it lists to within "
            f"{100 * error[worst]:.2f}% (largest difference: {worst})."
        )
    return text


LEARNED = 0.9  # below this best accuracy the budget was too short to say anything
MARGIN = 0.02  # accuracy within which two networks count as equally good


def accuracy_sentence(rows: Sequence[dict], settings: Settings) -> str:
    """The verdict on accuracy, from the numbers: does a small network match the big ones?"""
    trained = [r for r in rows if r["train"] is not None]
    acc = {r["arch"]: r["train"]["accuracy"] for r in trained}
    params = {r["arch"]: r["digits_params"] for r in trained}
    small = [a for a in acc if params[a] <= SMALL_PARAMS]
    large = [a for a in acc if params[a] > SMALL_PARAMS]
    if not small or not large:
        return (
            f"This size trained no network on one side of {SMALL_PARAMS:,} parameters, so the "
            "accuracy part of the claim is untested here."
        )
    best_small, best_large = max(small, key=acc.get), max(large, key=acc.get)
    gap = acc[best_large] - acc[best_small]
    below = [a for a in large if acc[a] < acc[best_small] - MARGIN]
    text = (
        f"After {settings.epochs} epoch(s) at batch {settings.train_batch} on the digits, the "
        f"best small network (at most {SMALL_PARAMS:,} parameters) was {best_small} "
        f"({params[best_small]:,} parameters) at {acc[best_small]:.3f} test accuracy"
        + "".join(f", {a} ({params[a]:,}) at {acc[a]:.3f}" for a in small if a != best_small)
        + f"; the best larger one was {best_large} ({params[best_large]:,} parameters) at "
        f"{acc[best_large]:.3f}, and {len(below)} of the {len(large)} larger networks trained "
        f"scored more than {100 * MARGIN:g} points below {best_small}."
    )
    if max(acc.values()) < LEARNED:
        return text + (
            f" No network reached {LEARNED:g}: the budget is too short to learn the digits, so "
            "this run says nothing either way about the accuracy part of the claim."
        )
    if gap <= MARGIN:
        return text + (
            f" As measured, the larger networks bought at most {100 * max(gap, 0):.1f} points "
            f"(within {100 * MARGIN:g}) over a small one on this problem at this budget: the "
            "claim held."
        )
    return text + (
        f" As measured, {best_large} beat every small network by {100 * gap:.1f} points at "
        "this budget, so the claim did not hold in this run."
    )


def chance_text(rows: Sequence[dict], num_classes: int) -> str | None:
    """Name the runs that learned nothing (accuracy at chance), with the trainer's numbers."""
    stuck = [
        r for r in rows if r["train"] is not None and r["train"]["accuracy"] <= 1.5 / num_classes
    ]
    if not stuck:
        return None
    parts = [
        f"{r['arch']} (test accuracy {r['train']['accuracy']:.3f}, last epoch's train loss "
        f"{r['train']['final_train_loss']:.4f} against ln {num_classes} = "
        f"{math.log(num_classes):.4f} for a constant guess)"
        for r in stuck
    ]
    return (
        f"At chance after the budget: {'; '.join(parts)}. Such a run predicts one constant "
        "distribution: with the trainer's defaults it did not learn at this budget (the cause "
        "was not investigated here). Reported as measured, not tuned away."
    )


def ratio_text(ratio: float) -> str:
    return f"{ratio:,.0f}" if ratio >= 10 else f"{ratio:.1f}"


def macs_text(macs: float) -> str:
    return f"{macs / 1e9:.3g} G" if macs >= 1e9 else f"{macs / 1e6:.3g} M"


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Rank correlation (ties broken by order): does speed fall as cost rises?"""
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


FOLLOWS = -0.8  # a rank correlation of cost and speed at most this: "the cost follows"


def cost_sentence(rows: Sequence[dict]) -> str:
    """How far apart the networks are in size, cost and measured speed."""
    design = [r["design"] for r in rows]
    lo_p, hi_p = min(d["params"] for d in design), max(d["params"] for d in design)
    lo_m, hi_m = min(d["macs"] for d in design), max(d["macs"] for d in design)
    text = (
        f"At their design points the networks range from {lo_p:,} to {hi_p:,} parameters "
        f"(x{ratio_text(hi_p / lo_p)}) and from {macs_text(lo_m)} to {macs_text(hi_m)} "
        f"multiply-adds per image (x{ratio_text(hi_m / lo_m)})."
    )
    speed = {r["arch"]: r["bench"]["train_images_per_sec"] for r in rows if r["bench"]}
    if len(speed) >= 2:
        slow, fast = min(speed, key=speed.get), max(speed, key=speed.get)
        text += (
            f" On this machine the train step of the {len(speed)} networks benched ran from "
            f"{speed[slow]:,.1f} images/s ({slow}) to {speed[fast]:,.0f} images/s ({fast}), "
            f"x{ratio_text(speed[fast] / speed[slow])} apart."
        )
    if len(speed) >= 3:
        benched = [r for r in rows if r["bench"]]
        rho = spearman(
            [r["bench"]["macs_per_image"] for r in benched],
            [r["bench"]["train_images_per_sec"] for r in benched],
        )
        verdict = (
            "the cost part of the claim held"
            if rho <= FOLLOWS
            else (f"the cost part of the claim did not hold (a rank correlation above {FOLLOWS:g})")
        )
        text += (
            f" The rank correlation of multiply-adds per image (at the benched input) with "
            f"train images/s is {rho:+.2f}: {verdict}."
        )
    return text


def skipped_text(rows: Sequence[dict], what: str, key: str) -> str | None:
    skipped = [r for r in rows if r[key]]
    if not skipped:
        return None
    names = "; ".join(f"{r['arch']} ({r[key]})" for r in skipped)
    return (
        f"Not {what} at this size, so those cells are empty (not estimated), over its cost "
        f"limits at the digits input: {names}. `--full` measures them all."
    )


def defaults_text() -> str:
    """The trainer's default recipe, read from TrainConfig so that the page cannot go stale."""
    d = TrainConfig()
    return (
        f"SGD + Nesterov, lr 0.1 per 256 images, {d.warmup_epochs:g} warm-up epochs, "
        f"{d.schedule}, label smoothing {d.label_smoothing:g}, weight decay 5e-4, "
        f"augmentation {d.augment}"
    )


def limits_text(settings: Settings) -> str:
    """The cost limits that keep a size within minutes, in words ('' when none)."""
    parts = []
    for what, mmacs in (
        ("benched", settings.bench_max_mmacs),
        ("trained", settings.train_max_mmacs),
    ):
        if mmacs is not None or settings.max_layers is not None:
            caps = [f"{mmacs:g} M multiply-adds per image"] if mmacs is not None else []
            if settings.max_layers is not None:
                caps.append(f"{settings.max_layers} conv/dense layers")
            parts.append(f"{what} only up to {' and '.join(caps)}")
    if not parts:
        return ""
    return (
        " This size keeps within minutes on 2 CPU cores by cost at the digits input (a step's "
        "multiply-adds; the layer count, which sets the compile time): networks are "
        + "; ".join(parts)
        + "."
    )


def write_page(
    run: harness.Run, rows: list[dict], settings: Settings, digits: tuple[int, int], archs: list
) -> None:
    native, num_classes = digits
    page = harness.Page(
        run,
        "The zoo: every architecture, its size, its speed and a short digits run",
        claim="The classic CNNs span more than three orders of magnitude in parameters and "
        "multiply-adds, and their cost (train-step speed) follows; a bigger network is not "
        "automatically a better "
        "one: on a small problem such as 8x8 handwritten digits a small network (here: at most "
        f"{SMALL_PARAMS:,} parameters, LeNet-5 or simple_cnn) learns as well as the giants.",
    )
    page.heading("At the design point (no compile: jax.eval_shape)")
    page.text(
        "Parameters and forward multiply-adds per image at each network's registered design "
        "input and class count, beside the published count where the reference file "
        "(tests/reference/torchvision.json) has one: torchvision 0.29's counts (exact), the "
        "course's LeNet-5 and NetResDeep counts (exact) and He et al. 2016's CIFAR ResNet "
        "counts (millions, rounded: a match means our count rounds to theirs)."
    )
    page.table(*design_table(rows))
    page.text(reference_sentence(rows))
    page.heading("On this machine")
    bench_where = (
        "at its design input and class count"
        if settings.bench_at_design
        else "at the same input as the digits training"
    )
    page.text(
        f"Input, parameters and multiply-adds of the network the digits run trains: the "
        f"{native}x{native} digits raised to each model's minimum, ResNet-18..152 with their "
        f"small-input stem, {num_classes} classes (`flaxcnn.models.resolve_input`). "
        f"Throughput from `flaxcnn.bench.benchmark` {bench_where}: global batch "
        f"{settings.bench_batch}, {settings.bench_steps} timed step(s) after one compiling and "
        "one warm-up call, float32, synthetic data, the trainer's default optimizer; compile "
        "is the first train-step call. Accuracy: `flaxcnn.training.train` on the digits "
        f"(1,293 train / 144 validation / 360 test images), the same budget for every network: "
        f"{settings.epochs} epoch(s) at batch {settings.train_batch}, every other setting the "
        f"trainer's default ({defaults_text()}, seed 0); the final test accuracy."
        + limits_text(settings)
    )
    page.table(*machine_table(rows, settings))
    for note in (
        skipped_text(rows, "benched", "bench_skipped"),
        skipped_text(rows, "trained", "train_skipped"),
        chance_text(rows, num_classes),
    ):
        if note:
            page.text(note)
    page.figure(
        harness.save_figure(figure(rows, settings), run.path(".png")),
        "Left: train-step images per second against forward multiply-adds per image (both log "
        "scale), one point per network benched, coloured by family. Right: digits test accuracy "
        "after "
        "the fixed budget against forward multiply-adds per image at the digits input (log "
        "scale), one point per network trained at this size.",
    )
    page.heading("What the table shows")
    page.text(cost_sentence(rows))
    page.text(accuracy_sentence(rows, settings))
    if not run.full:
        page.heading("Full setting (not run here)")
        page.text(
            "On a GPU/TPU: every network benched at its design input and class count (batch "
            "128, 20 timed steps) and trained on the digits for 30 epochs at batch 128:\n\n"
            "```bash\npython experiments/zoo.py --full\n```\n\nIt writes zoo-full.md; until it "
            "runs, its cells stay empty:"
        )
        page.table(*full_not_run_table(archs))
    page.write(
        data={
            "settings": dataclasses.asdict(settings),
            "small_params": SMALL_PARAMS,
            "digits_native_size": native,
            "digits_num_classes": num_classes,
            "archs": archs,
            "rows": rows,
        }
    )


# --- main -----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arch",
        action="append",
        metavar="NAME[,NAME...]",
        help="only these architectures (repeatable or comma-separated; default: all "
        f"registered, or {' and '.join(SMOKE_ARCHS)} with --smoke); the size's cost limits "
        "still apply",
    )


def progress_line(i: int, n: int, row: dict[str, Any]) -> str:
    b, t = row["bench"], row["train"]
    parts = [f"[{i}/{n}] {row['arch']}:"]
    parts.append("not benched" if b is None else f"train {b['train_images_per_sec']:,.0f} img/s")
    if t is not None:
        parts.append(f"digits acc {t['accuracy']:.3f}")
    took = (b["wall_sec"] if b else 0) + (t["wall_sec"] if t else 0)
    return " ".join(parts) + f" ({took:.0f} s)"


def main(argv: Sequence[str] | None = None) -> None:
    run = harness.start("zoo", __doc__, argv, add_arguments)
    default = SMOKE_ARCHS if run.smoke else models.names()
    archs = sort_by_family(parse_archs(run.args.arch, default))
    settings = run.pick(smoke=SETTINGS["smoke"], quick=SETTINGS["quick"], full=SETTINGS["full"])
    reference = json.loads(REFERENCE.read_text())
    info = data.load(DATASET, data_dir=run.data_dir).info
    digits = (max(info.image_shape[:2]), info.num_classes)
    rows = []
    for i, arch in enumerate(archs, 1):
        rows.append(measure(arch, settings, run, digits, reference))
        print(progress_line(i, len(archs), rows[-1]), flush=True)
    write_page(run, rows, settings, digits, archs)


if __name__ == "__main__":
    harness.main_guard(main)
