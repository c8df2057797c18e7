"""Small folders: with the trainer's defaults, 150-300 images train to 95% in 10 epochs.

Claim (issue 21, item 3): with no flag but `--epochs` of 10 or less, a folder of about 150
to 300 images in 2 to 5 classes of simple shapes or digits reaches at least 95% test
accuracy. What makes it so is the trainer's rule for small training splits
(`flaxcnn.training.resolve`, `flaxcnn.training.optim`, `flaxcnn.data.transforms`): the
default batch halves until an epoch has enough steps, down to 8; the learning rate no
longer shrinks below a batch of 64's; and a split too small for a batch of 64 trains
without random crops unless `--augment` says otherwise.

Measured: the script draws seven folders itself, the same bytes every time, under its
workdir (`folders/NAME/CLASS/i.png`): three of scikit-learn's 8x8 digits raised to 32x32
PNGs and four of shapes drawn at 64x64 (two in random colours, two black on white). Each
folder x architecture x seed is then trained exactly as a user would type it,

    python -m flaxcnn.train --arch A --dataset folder:PATH --epochs 10 --seed S \\
        --workdir W --data-dir D --no-progress

one run at a time in its own process (no other flag: the point is the defaults), and its
final test accuracy is read from the run's metrics.jsonl (the last test row: the final
weights), its resolved batch, learning rate and augmentation from its config.json.

    python experiments/small_data.py --smoke  # d2x75, lenet5, seed 0, 1 epoch (seconds)
    python experiments/small_data.py          # --quick: 7 folders x simple_cnn, lenet5,
                                              #   resnet20 x seeds 0-2 (63 runs, ~30 min)
    python experiments/small_data.py --full   # + resnet18, seeds 0-4 (140 runs)
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import harness
import numpy as np
from PIL import Image, ImageDraw

from flaxcnn import cli  # jax and matplotlib load where used: a bad argument is refused fast

THRESHOLD = 0.95  # the claim's test accuracy
# The trainer's accuracy is a ratio of counts in floating point: 57/60 may come back a hair
# under 0.95. A difference this small is no test image.
TOLERANCE = 1e-6
REACHED = "✓"  # a table cell whose every seed reached THRESHOLD
N_SAMPLES = 6  # sample images per folder in the figure

DIGITS, SHAPES, PLAIN = "digits", "coloured shapes", "black-on-white shapes"
KINDS = (DIGITS, SHAPES, PLAIN)


# --- the folders ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Folder:
    """One generated data set: its kind, classes (in drawing order) and images per class."""

    name: str
    kind: str
    classes: tuple[str, ...]
    per_class: int
    seed: int | None = None  # the shapes' random stream; the digits are the first N of each

    @property
    def images(self) -> int:
        return len(self.classes) * self.per_class


FOLDERS = {
    f.name: f
    for f in (
        Folder("d2x75", DIGITS, ("3", "8"), 75),
        Folder("d3x60", DIGITS, ("0", "1", "7"), 60),
        Folder("d5x50", DIGITS, ("2", "3", "5", "8", "9"), 50),
        Folder("s3x70", SHAPES, ("circle", "square", "triangle"), 70, seed=1),
        Folder("s4x60", SHAPES, ("circle", "square", "triangle", "star"), 60, seed=2),
        Folder("p3x70", PLAIN, ("circle", "square", "triangle"), 70, seed=11),
        Folder("p5x60", PLAIN, ("circle", "square", "triangle", "star", "cross"), 60, seed=12),
    )
}
SHAPE_SIZE = 64  # pixels, drawn shapes
DIGIT_SIZE = 32  # pixels, the 8x8 digits raised bilinearly
PLAIN_INK = 150  # grey level below which a drawn pixel becomes black, else white


def regular_polygon(
    cx: float, cy: float, r: float, sides: int, rotation: float
) -> list[tuple[float, float]]:
    """The corners of a regular polygon of circumradius `r`."""
    return [
        (cx + r * math.cos(rotation + 2 * math.pi * k / sides),
         cy + r * math.sin(rotation + 2 * math.pi * k / sides))
        for k in range(sides)
    ]  # fmt: skip


def draw_shape(kind: str, rng: random.Random) -> Image.Image:
    """One shape of random size, place, rotation and colours on a light background.

    The draws from `rng` come in a fixed order (background, ink, radius, centre, angle), so
    a seed gives the same images: the folders the small-data rule was chosen on.
    """
    background = tuple(rng.randint(170, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 120) for _ in range(3))
    image = Image.new("RGB", (SHAPE_SIZE, SHAPE_SIZE), background)
    draw = ImageDraw.Draw(image)
    r = rng.uniform(10, 22)
    cx = rng.uniform(r + 2, SHAPE_SIZE - 2 - r)
    cy = rng.uniform(r + 2, SHAPE_SIZE - 2 - r)
    angle = rng.uniform(0, 2 * math.pi)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=ink)
    elif kind == "square":
        draw.polygon(regular_polygon(cx, cy, r, 4, angle), fill=ink)
    elif kind == "triangle":
        draw.polygon(regular_polygon(cx, cy, r, 3, angle), fill=ink)
    elif kind == "cross":
        width = int(max(2, r / 3))
        for rotation in (angle, angle + math.pi / 2):
            dx, dy = r * math.cos(rotation), r * math.sin(rotation)
            draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=ink, width=width)
    elif kind == "star":
        points = []
        for k in range(10):  # five points, five inner corners at 0.45 of the radius
            rr = r if k % 2 == 0 else r * 0.45
            rotation = angle + math.pi * k / 5
            points.append((cx + rr * math.cos(rotation), cy + rr * math.sin(rotation)))
        draw.polygon(points, fill=ink)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return image


def black_on_white(image: Image.Image) -> Image.Image:
    """A drawn shape thresholded to black ink on white: only size, place and rotation left."""
    grey = np.asarray(image.convert("L"))
    return Image.fromarray(np.where(grey < PLAIN_INK, 0, 255).astype(np.uint8)).convert("RGB")


def folder_images(folder: Folder) -> Iterator[tuple[str, int, Image.Image]]:
    """(class, index, image) for every image of `folder`, in drawing order."""
    if folder.kind == DIGITS:
        from sklearn.datasets import load_digits  # seconds of imports: only to draw digits

        digits = load_digits()
        for label in folder.classes:
            chosen = digits.images[digits.target == int(label)][: folder.per_class]
            for i, pixels in enumerate(chosen):
                grey = Image.fromarray((pixels * 255 / 16).astype(np.uint8))
                yield label, i, grey.resize((DIGIT_SIZE, DIGIT_SIZE), Image.Resampling.BILINEAR)
        return
    rng = random.Random(folder.seed)  # one stream through every class, in class order
    for kind in folder.classes:
        for i in range(folder.per_class):
            image = draw_shape(kind, rng)
            yield kind, i, black_on_white(image) if folder.kind == PLAIN else image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_folder(folder: Folder, root: Path) -> Path:
    """Write `root/NAME/CLASS/i.png`; a folder already holding exactly these bytes is left
    untouched (its file times too, so the trainer reuses its prepared copy of it)."""
    path = root / folder.name
    wanted = {
        Path(label, f"{i}.png"): png_bytes(image) for label, i, image in folder_images(folder)
    }
    present = {p.relative_to(path) for p in path.rglob("*") if p.is_file()}
    if present == set(wanted) and all((path / p).read_bytes() == b for p, b in wanted.items()):
        return path
    shutil.rmtree(path, ignore_errors=True)
    for relative, data in wanted.items():
        (path / relative).parent.mkdir(parents=True, exist_ok=True)
        (path / relative).write_bytes(data)
    return path


def folder_digest(path: Path) -> str:
    """sha256 over every file's relative path and bytes: equal digests, equal folders."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0".encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


# --- the training runs ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """One size: which folders, networks and seeds, and the epochs every run gets."""

    folders: tuple[str, ...]
    archs: tuple[str, ...]
    seeds: tuple[int, ...]
    epochs: int


QUICK_ARCHS = ("simple_cnn", "lenet5", "resnet20")
SETTINGS = {
    "smoke": Settings(("d2x75",), ("lenet5",), (0,), epochs=1),
    "quick": Settings(tuple(FOLDERS), QUICK_ARCHS, (0, 1, 2), epochs=10),
    "full": Settings(tuple(FOLDERS), (*QUICK_ARCHS, "resnet18"), (0, 1, 2, 3, 4), epochs=10),
}
# What each run's config.json says the trainer chose, kept in the results.
CONFIG_KEYS = ("batch_size", "batch_size_chosen", "steps_per_epoch", "lr", "lr_min_batch",
               "peak_lr", "augment", "optimizer", "schedule", "warmup_epochs", "weight_decay",
               "label_smoothing", "image_size", "val_fraction")  # fmt: skip


def train_command(
    arch: str, folder: Path, epochs: int, seed: int, workdir: Path, data_dir: Path
) -> list[str]:
    """What a user types (with this interpreter): no flag that changes the training but
    --epochs and --seed."""
    return [sys.executable, "-m", "flaxcnn.train", "--arch", arch,
            "--dataset", f"folder:{folder}", "--epochs", str(epochs), "--seed", str(seed),
            "--workdir", str(workdir), "--data-dir", str(data_dir), "--no-progress"]  # fmt: skip


def child_environment() -> dict[str, str]:
    """The environment, with this checkout's flaxcnn first on the path: the child trains
    the code whose commit the page names, whatever an installed copy points at."""
    root = str(Path(cli.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root if not path else f"{root}{os.pathsep}{path}"}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_of(records: Sequence[dict[str, Any]], split: str) -> dict[str, Any]:
    rows = [r for r in records if r.get("split") == split]
    return rows[-1] if rows else {}


def read_run(workdir: Path) -> dict[str, Any]:
    """A finished run's numbers, from the files the trainer wrote (none invented here)."""
    records = read_jsonl(workdir / "metrics.jsonl")
    config_path = workdir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    test, train = last_of(records, "test"), last_of(records, "train")
    val = last_of(records, "val")
    data = config.get("data", {})
    return {
        "test_accuracy": test.get("accuracy"),
        "test_loss": test.get("loss"),
        "test_epoch": test.get("epoch"),
        "val_accuracy": val.get("accuracy"),
        "final_train_accuracy": train.get("accuracy"),
        "final_train_loss": train.get("loss"),
        "config": {k: config.get(k) for k in CONFIG_KEYS},
        "data": {
            "num_train": data.get("num_train"),
            "num_val": data.get("num_val"),
            "num_test": data.get("num_test"),
            "num_classes": data.get("num_classes"),
            "class_names": data.get("class_names"),
            "channels": len(data["mean"]) if data.get("mean") else None,
            "val_source": data.get("val_source"),
        },
    }


def train_one(
    run: harness.Run, folder: str, path: Path, arch: str, seed: int, epochs: int, data_dir: Path
) -> dict[str, Any]:
    """One run in its own process; its checkpoints are deleted after (metrics are kept)."""
    workdir = run.train_workdir(f"runs/{folder}-{arch}-seed{seed}")
    command = train_command(arch, path, epochs, seed, workdir, data_dir)
    start = time.perf_counter()
    done = subprocess.run(command, env=child_environment(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
    result: dict[str, Any] = {
        "folder": folder,
        "arch": arch,
        "seed": seed,
        "epochs": epochs,
        "command": shlex.join(["python", *command[1:]]),
        "workdir": str(workdir),
        "exit_code": done.returncode,
        "wall_sec": round(wall, 2),
        "error": None,
        **read_run(workdir),
    }
    if done.returncode != 0:  # a failed run reached nothing, whatever it logged before
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        result["error"] = lines[-1] if lines else f"exit code {done.returncode}"
        result["test_accuracy"] = None
    return result


# --- the numbers ----------------------------------------------------------------------------


def reached(accuracy: float | None) -> bool:
    return accuracy is not None and accuracy >= THRESHOLD - TOLERANCE


def summarize(runs: Sequence[dict], settings: Settings) -> list[dict[str, Any]]:
    """One cell per folder and architecture: its seeds' mean and min, and whether every
    seed reached THRESHOLD (a failed run counts as one that did not)."""
    cells = []
    for name in settings.folders:
        for arch in settings.archs:
            mine = [r for r in runs if r["folder"] == name and r["arch"] == arch]
            finished = [r["test_accuracy"] for r in mine if r["test_accuracy"] is not None]
            cells.append(
                {
                    "folder": name,
                    "kind": FOLDERS[name].kind,
                    "arch": arch,
                    "runs": len(mine),
                    "failed": len(mine) - len(finished),
                    "mean": float(np.mean(finished)) if finished else None,
                    "min": min(finished) if finished else None,
                    "reached": sum(reached(a) for a in finished),
                    "met": bool(mine) and all(reached(r["test_accuracy"]) for r in mine),
                }
            )
    return cells


def cell_text(cell: dict[str, Any]) -> str | None:
    """`mean (min x) ✓`: the mark only when every seed reached THRESHOLD."""
    if not cell["runs"]:
        return None
    if cell["mean"] is None:
        return f"failed ({cell['failed']} of {cell['runs']})"
    text = f"{cell['mean']:.3f} (min {cell['min']:.3f})"
    if cell["failed"]:
        text += f", {cell['failed']} failed"
    return f"{text} {REACHED}" if cell["met"] else text


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def miss_text(cell: dict[str, Any]) -> str:
    """A pair that missed, with its numbers."""
    if cell["mean"] is None:
        return f"{cell['folder']} (every run failed)"
    failed = f", {plural(cell['failed'], 'run')} failed" if cell["failed"] else ""
    return (
        f"{cell['folder']} (mean {cell['mean']:.3f}, min {cell['min']:.3f}, "
        f"{cell['reached']} of {cell['runs']} seeds{failed})"
    )


def verdict(cells: Sequence[dict[str, Any]], epochs: int) -> str:
    """Whether the claim held, from the numbers: every pair, by network, by kind, no choice
    of the good ones."""
    if not cells:
        return "Nothing was trained, so the claim is untested here."
    met = [c for c in cells if c["met"]]
    runs = sum(c["runs"] for c in cells)
    hits = sum(c["reached"] for c in cells)
    budget = f"--epochs {epochs} and no other flag"
    if len(met) == len(cells):
        return (
            f"The claim held as measured: with {budget}, every folder reached "
            f"{THRESHOLD:g} test accuracy with every network on every seed ({hits} of {runs} "
            "runs)."
        )
    if met:
        head = (
            f"The claim held only in part: with {budget}, {len(met)} of the {len(cells)} "
            f"folder-network pairs reached {THRESHOLD:g} test accuracy on every seed "
            f"({hits} of {runs} runs did)."
        )
    else:
        head = (
            f"The claim did not hold: with {budget}, no folder reached {THRESHOLD:g} test "
            f"accuracy on every seed with any network ({hits} of {runs} runs did)."
        )
    parts = [head]
    for arch in dict.fromkeys(c["arch"] for c in cells):
        mine = [c for c in cells if c["arch"] == arch]
        good = [c["folder"] for c in mine if c["met"]]
        misses = [miss_text(c) for c in mine if not c["met"]]
        text = f"{arch} met it on {len(good)} of {len(mine)} folders"
        text += f" ({', '.join(good)})" if good else ""
        text += f"; not on {'; '.join(misses)}." if misses else "."
        parts.append(text)
    kinds = [k for k in KINDS if any(c["kind"] == k for c in cells)]
    if len(kinds) > 1:
        counts = []
        for kind in kinds:
            mine = [c for c in cells if c["kind"] == kind]
            counts.append(f"{kind} {sum(c['met'] for c in mine)} of {len(mine)}")
        parts.append(f"Pairs met, by kind of folder: {', '.join(counts)}.")
    folders = list(dict.fromkeys(c["folder"] for c in cells))
    nobody = [f for f in folders if not any(c["met"] for c in cells if c["folder"] == f)]
    if nobody and len(nobody) < len(folders):
        parts.append(f"No network met it on {', '.join(nobody)}.")
    failed = sum(c["failed"] for c in cells)
    if failed:
        parts.append(f"{plural(failed, 'run')} failed; a failed run counts as one that did not.")
    return " ".join(parts)


def folder_facts(name: str, runs: Sequence[dict]) -> dict[str, Any]:
    """The split sizes the trainer made of a folder, as its runs' config.json record them
    (the same in every run: the split is fixed; where they differ, all are listed)."""
    seen: dict[str, list] = {}
    for r in runs:
        if r["folder"] == name:
            for key, value in r["data"].items():
                if value is not None and value not in seen.setdefault(key, []):
                    seen[key].append(value)
    return {k: v[0] if len(v) == 1 else v for k, v in seen.items()}


def joined(values: Sequence[Any], fmt: str = "") -> str | None:
    """The distinct values, in order: one value plainly, several joined with ' / '."""
    distinct = list(dict.fromkeys(values))
    return " / ".join(harness.cell(v, fmt) for v in distinct) if distinct else None


def count_text(value: Any) -> str | None:
    return joined(value if isinstance(value, list) else [value]) if value is not None else None


# --- the page -------------------------------------------------------------------------------


def results_table(
    cells: Sequence[dict], settings: Settings, facts: dict[str, dict]
) -> tuple[list[str], list[list[Any]]]:
    headers = ["folder", "kind", "classes", "images", "train / val / test"]
    headers += [f"{arch}: mean (min)" for arch in settings.archs]
    body = []
    for name in settings.folders:
        folder, f = FOLDERS[name], facts[name]
        splits = None
        if all(k in f for k in ("num_train", "num_val", "num_test")):
            splits = " / ".join(count_text(f[k]) for k in ("num_train", "num_val", "num_test"))
        row = [name, folder.kind, ", ".join(folder.classes), folder.images, splits]
        by_arch = {c["arch"]: c for c in cells if c["folder"] == name}
        row += [cell_text(by_arch[a]) for a in settings.archs]
        body.append(row)
    return headers, body


def rule_table(
    runs: Sequence[dict], settings: Settings, facts: dict[str, dict]
) -> tuple[list[str], list[list[Any]]]:
    """What the trainer chose for each folder, read from the runs' config.json."""
    headers = ["folder", "train images", "batch", "steps / epoch", "--lr (per 256)",
               "lr floor batch", "peak lr", "augment", "input"]  # fmt: skip
    body = []
    for name in settings.folders:
        mine = [r for r in runs if r["folder"] == name and r["config"]["batch_size"] is not None]
        configs = [r["config"] for r in mine]
        sizes = {r["arch"]: r["config"]["image_size"] for r in mine}
        channels = count_text(facts[name].get("channels"))
        if len(set(sizes.values())) == 1:
            (size,) = set(sizes.values())
            shown = f"{size}x{size}" + (f"x{channels}" if channels else "")
        else:
            shown = ", ".join(f"{a} {s}x{s}" for a, s in sizes.items()) or None
        body.append(
            [name, count_text(facts[name].get("num_train")),
             joined([c["batch_size"] for c in configs]),
             joined([c["steps_per_epoch"] for c in configs]),
             joined([c["lr"] for c in configs], "g"),
             joined([c["lr_min_batch"] for c in configs]),
             joined([c["peak_lr"] for c in configs], "g"),
             joined([c["augment"] for c in configs]), shown]
        )  # fmt: skip
    return headers, body


def rule_text(runs: Sequence[dict]) -> str:
    """The rule in words, with the trainer's own constants (imported, not copied)."""
    from flaxcnn.training import optim, resolve  # jax: only once the runs are done

    chosen = [r["config"]["batch_size_chosen"] for r in runs if r["config"]["batch_size"]]
    who = (
        "the trainer chose every batch, no --batch-size was given" if chosen and all(chosen) else ""
    )
    return (
        "The trainer's rule for small training splits, as the code that trained these runs "
        f"has it: with no --batch-size the batch starts at {resolve.DEFAULT_BATCH_SIZE} and "
        f"halves until an epoch has at least {resolve.MIN_STEPS_PER_EPOCH} steps, but not "
        f"below {resolve.MIN_DEFAULT_BATCH}; --lr is the rate for {optim.REFERENCE_BATCH} "
        f"images and scales linearly with the batch, but a batch below "
        f"{optim.LR_MIN_BATCH} takes a batch of {optim.LR_MIN_BATCH}'s rate; and with no "
        f"--augment, a training split under {resolve.SMALL_SPLIT:,} images trains without "
        "random crops. What it resolved to for each folder, read from the runs' config.json "
        f"({who + '; ' if who else ''}where runs of a folder differ, every value is listed):"
    )


def splits_text(runs: Sequence[dict]) -> str:
    """How the trainer split the folders: its fixed test share, the runs' validation share."""
    from flaxcnn.data import folder_listing

    shares = [r["config"]["val_fraction"] for r in runs if r["config"]["val_fraction"]]
    held = joined(shares, ".0%")
    val = f", then {held} of the rest held out for validation (--val-fraction)" if held else ""
    return (
        f"The trainer splits each folder itself: a fixed {folder_listing.TEST_FRACTION:.0%} "
        f"for testing (seed {folder_listing.SPLIT_SEED}){val}."
    )


def seeds_text(seeds: Sequence[int]) -> str:
    return ", ".join(map(str, seeds))


def timing_text(runs: Sequence[dict]) -> str:
    """How long the runs took (each one's time is in the JSON)."""
    walls = [r["wall_sec"] for r in runs]
    each = (
        f"{walls[0]:.0f} s"
        if len(walls) == 1
        else f"{min(walls):.0f} to {max(walls):.0f} s a run, {sum(walls) / 60:.1f} min in all"
    )
    return (
        f"{len(runs)} run{'s' if len(runs) != 1 else ''}, one at a time, each in its own "
        f"process: {each} (each: start-up, preparing the folder on its first run, compiling "
        "and training). The JSON has every run's command, time and numbers."
    )


def failures_text(runs: Sequence[dict]) -> str | None:
    failed = [r for r in runs if r["exit_code"] != 0]
    if not failed:
        return None
    parts = [
        f"{r['folder']} {r['arch']} seed {r['seed']} (exit code {r['exit_code']}: {r['error']})"
        for r in failed
    ]
    return f"Runs that failed, reported as they ended: {'; '.join(parts)}."


def coarseness_text(facts: dict[str, dict]) -> str | None:
    """How coarse a test accuracy is: what one image is worth, and how many errors the
    claim allows, on the smallest and the largest test split."""
    sizes = sorted({n for f in facts.values() for n in np.atleast_1d(f.get("num_test", []))})
    if not sizes:
        return None
    lo, hi = int(sizes[0]), int(sizes[-1])

    def allowed(n: int) -> int:
        return math.floor((1 - THRESHOLD) * n + TOLERANCE)

    if lo == hi:
        errors = "1 wrong answer" if allowed(lo) == 1 else f"{allowed(lo)} wrong answers"
        return (
            f"The test split holds {lo} images: one image is {100 / lo:.1f} points, and "
            f"{THRESHOLD:g} allows {errors}."
        )
    return (
        f"The test splits hold {lo} to {hi} images: one image is {100 / hi:.1f} to "
        f"{100 / lo:.1f} points, and {THRESHOLD:g} allows {allowed(lo)} to {allowed(hi)} "
        "wrong answers."
    )


ARCH_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def sample_paths(path: Path, folder: Folder, count: int) -> list[tuple[str, Path]]:
    """The first images of each class in turn: `count` (class, file) pairs."""
    k = len(folder.classes)
    return [
        (folder.classes[i % k], path / folder.classes[i % k] / f"{i // k}.png")
        for i in range(count)
    ]


def figure(paths: dict[str, Path], runs: Sequence[dict], cells: Sequence[dict], s: Settings):
    """Left: sample images of every folder; right: each run's test accuracy, by network."""
    rows = len(s.folders)
    fig = harness.new_figure(14, max(3.2, 1.0 * rows + 1.0))
    samples, chart = fig.subfigures(1, 2, width_ratios=[N_SAMPLES, 8])
    grid = samples.subplots(rows, N_SAMPLES, squeeze=False)
    for axes, name in zip(grid, s.folders, strict=True):
        folder = FOLDERS[name]
        for ax, (label, file) in zip(axes, sample_paths(paths[name], folder, N_SAMPLES),
                                     strict=True):  # fmt: skip
            with Image.open(file) as image:
                pixels = np.asarray(image)
            ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(label, fontsize=7, pad=2)
        axes[0].set_ylabel(name, fontsize=9)
    samples.suptitle("sample images (class above each)", fontsize=9)
    ax = chart.subplots()
    n = len(s.archs)
    width = 0.7 / n
    accuracies = [r["test_accuracy"] for r in runs if r["test_accuracy"] is not None]
    bottom = max(0.0, min([*accuracies, 0.9]) - 0.05)
    for j, (arch, color) in enumerate(zip(s.archs, ARCH_COLORS, strict=False)):
        for i, name in enumerate(s.folders):
            x = i + (j - (n - 1) / 2) * width
            mine = [r for r in runs if r["folder"] == name and r["arch"] == arch]
            for k, r in enumerate(mine):
                dx = (k - (len(mine) - 1) / 2) * width / (len(mine) + 1)
                if r["test_accuracy"] is None:
                    ax.scatter([x + dx], [bottom + 0.01], marker="x", color=color, s=30, zorder=3)
                else:
                    ax.scatter([x + dx], [r["test_accuracy"]], color=color, s=18, zorder=3,
                               alpha=0.8, edgecolors="none")  # fmt: skip
            cell = next(c for c in cells if c["folder"] == name and c["arch"] == arch)
            if cell["mean"] is not None:
                ax.hlines(cell["mean"], x - width / 2.5, x + width / 2.5, color=color, lw=1.5)
        ax.scatter([], [], color=color, s=18, label=arch)
    for i in range(rows - 1):  # a folder's dots between two lines
        ax.axvline(i + 0.5, color="0.85", linewidth=0.8)
    ax.axhline(THRESHOLD, color="0.3", linestyle="--", linewidth=1, label=f"{THRESHOLD:g}")
    if any(r["test_accuracy"] is None for r in runs):
        ax.scatter([], [], marker="x", color="0.3", label="failed run")
    ax.set_xticks(range(rows), list(s.folders))
    ax.set_xlim(-0.5, rows - 0.5)
    ax.set_ylim(bottom, 1.01)
    ax.set_ylabel("test accuracy (final weights)")
    ax.set_title(
        f"Test accuracy after --epochs {s.epochs}, every other setting the default "
        "(a dot per seed, a bar at the mean)",
        fontsize=9,
    )
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return fig


def folder_record(name: str, path: Path, facts: dict[str, Any]) -> dict[str, Any]:
    """A folder as the JSON keeps it: how it was drawn, its digest, the trainer's splits."""
    folder = FOLDERS[name]
    return {**dataclasses.asdict(folder), "images": folder.images, "path": str(path),
            "sha256": folder_digest(path), "splits": facts}  # fmt: skip


def write_page(
    run: harness.Run, settings: Settings, paths: dict[str, Path], runs: list[dict]
) -> None:
    cells = summarize(runs, settings)
    facts = {name: folder_facts(name, runs) for name in settings.folders}
    said = verdict(cells, settings.epochs)
    page = harness.Page(
        run,
        "Small folders: 95% with the trainer's defaults",
        claim="With no flag but `--epochs` of 10 or less, a folder of about 150 to 300 "
        "images in 2 to 5 classes of simple shapes or digits reaches at least 95% test "
        "accuracy (issue 21, item 3).",
    )
    page.heading("The folders and the test accuracy")
    page.text(
        f"The folders are drawn by this script, the same bytes every run: digits are the first "
        f"N images of each class among scikit-learn's 8x8 handwritten digits (16 grey "
        f"levels to 0-255), raised to {DIGIT_SIZE}x{DIGIT_SIZE} bilinearly; coloured shapes "
        f"are drawn at {SHAPE_SIZE}x{SHAPE_SIZE} (dark ink of a random colour on a light "
        "random background, random radius 10-22 px, place and rotation; a seeded stream per "
        f"folder); black-on-white shapes are the same drawings thresholded at grey level "
        f"{PLAIN_INK}. {splits_text(runs)} Each cell: the mean and "
        f"(in brackets) the lowest test accuracy over seeds {seeds_text(settings.seeds)} of "
        f"`python -m flaxcnn.train --arch A --dataset folder:PATH --epochs {settings.epochs} "
        f"--seed S` (and --workdir, --data-dir, --no-progress), the final weights' accuracy "
        f"from the run's metrics.jsonl; {REACHED}: every seed reached {THRESHOLD:g}."
    )
    page.table(*results_table(cells, settings, facts))
    for note in (coarseness_text(facts), failures_text(runs)):
        if note:
            page.text(note)
    page.figure(
        harness.save_figure(figure(paths, runs, cells, settings), run.path(".png")),
        "Left: the first images of each folder, one class after another. Right: each run's "
        "test accuracy (a dot per seed, a bar at the mean of the seeds), the dashed line at "
        f"{THRESHOLD:g}; a cross at the bottom is a run that failed.",
    )
    page.heading("What the trainer chose")
    page.text(rule_text(runs))
    page.table(*rule_table(runs, settings, facts))
    page.text(timing_text(runs))
    page.heading("Verdict")
    page.text(said)
    if not run.full:
        full = SETTINGS["full"]
        page.heading("Full setting (not run here)")
        page.text(
            f"Every folder with {', '.join(full.archs)} and seeds {seeds_text(full.seeds)} "
            f"({len(full.folders) * len(full.archs) * len(full.seeds)} runs):\n\n```bash\n"
            "python experiments/small_data.py --full\n```\n\nIt writes small_data-full.md; "
            "until it runs, its cells stay empty:"
        )
        page.table(
            ["folder", *full.archs], [[name, *[None] * len(full.archs)] for name in full.folders]
        )
    page.write(
        data={
            "settings": dataclasses.asdict(settings),
            "threshold": THRESHOLD,
            "folders": [folder_record(n, paths[n], facts[n]) for n in settings.folders],
            "runs": runs,
            "cells": cells,
            "verdict": said,
        }
    )


# --- main -----------------------------------------------------------------------------------


def progress_line(i: int, n: int, r: dict[str, Any]) -> str:
    head = f"[{i}/{n}] {r['folder']} {r['arch']} seed {r['seed']}:"
    if r["exit_code"] != 0:
        return f"{head} FAILED ({r['error']}) ({r['wall_sec']:.0f} s)"
    c = r["config"]
    return (
        f"{head} test {r['test_accuracy']:.3f} (batch {c['batch_size']}, lr {c['peak_lr']:g}, "
        f"augment {c['augment']}) ({r['wall_sec']:.0f} s)"
    )


def main(argv: Sequence[str] | None = None) -> None:
    run = harness.start("small_data", __doc__, argv)
    settings = SETTINGS[run.size]
    # The folders and the trainer's prepared copies are scratch, beside the runs: --publish
    # writes the committed results directory, which is no place for a thousand PNGs.
    root = run.workdir / "folders"
    data_dir = Path(run.data_dir) if run.data_dir else run.workdir / "data"
    paths = {name: make_folder(FOLDERS[name], root) for name in settings.folders}
    plan = [(f, a, s) for f in settings.folders for a in settings.archs for s in settings.seeds]
    runs = []
    for i, (name, arch, seed) in enumerate(plan, 1):
        runs.append(train_one(run, name, paths[name], arch, seed, settings.epochs, data_dir))
        print(progress_line(i, len(plan), runs[-1]), flush=True)
    write_page(run, settings, paths, runs)


if __name__ == "__main__":
    harness.main_guard(main)
