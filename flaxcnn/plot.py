"""`python -m flaxcnn.plot WORKDIR [WORKDIR ...]`: loss and accuracy curves of runs, one PNG.

Each run's `metrics.jsonl` gives a train and a test curve per panel (loss, top-1 accuracy)
against the epoch; several runs share the figure, one colour per run, named in the legend
by their workdirs' names, so that runs can be compared at a glance. The figure is drawn
with matplotlib's Agg canvas directly (no pyplot, no display, no global backend switch that
would disturb a notebook's own plots).

The PNG helpers here (`check_output`, `save_png`) are shared with `flaxcnn.evaluate`: an
output is checked before any slow work, and written to a temporary file renamed into place,
so that a crash never leaves half a PNG and nothing else in a workdir is touched.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from flaxcnn import cli

DEFAULT_NAME = "loss_accuracy.png"
DPI = 100
LEGEND_MARGIN = 10  # pixels kept free on either side of the legend

PathLike = str | os.PathLike


def check_output(output: PathLike) -> Path:
    """`output` as a Path, or UsageError when a PNG could not be written there.

    Called before the slow work, so that a typo in --output costs nothing.
    """
    path = Path(output)
    if path.is_dir():
        raise cli.UsageError(f"cannot write {path}: it is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise cli.UsageError(f"cannot write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise cli.UsageError(f"cannot write {path}: {parent} is not writable")
    return path


def new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas: never shown, independent of pyplot's state."""
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Figure, output: PathLike) -> Path:
    """Write `figure` as a PNG through a temporary file renamed into place (atomic)."""
    output = check_output(output)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # os.open applies the umask, so the PNG gets the permissions of any new file.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            figure.savefig(f, format="png", dpi=DPI)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise cli.UsageError(f"cannot write {output}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return output


def find_metrics(workdir: PathLike) -> Path:
    """The workdir's `metrics.jsonl`, or UsageError when there is none."""
    from flaxcnn.training.rundir import METRICS, RunDir  # here: it loads jax

    run = RunDir.existing(workdir)
    if not run.metrics_path.is_file():
        raise cli.UsageError(f"{run.path} has no {METRICS} (is it a training workdir?)")
    return run.metrics_path


def read_run(workdir: PathLike) -> list[dict]:
    """A run's metric records.

    UsageError for a missing workdir, a missing, empty or unreadable `metrics.jsonl`.
    """
    from flaxcnn.training.rundir import RunDir

    run = RunDir.existing(workdir)
    records = run.read_metrics()
    if not records:
        raise cli.UsageError(f"{run.metrics_path} holds no records yet")
    return records


def run_labels(workdirs: Sequence[PathLike]) -> list[str]:
    """Each run's legend label: its workdir's name, with as many parent directories as it
    takes to tell apart runs of the same name (`a/lenet5`, `b/lenet5`); the same workdir
    given twice is numbered."""
    parts = [Path(w).resolve().parts for w in workdirs]
    depth = [1] * len(parts)
    while True:
        labels = [Path(*p[-d:]).as_posix() for p, d in zip(parts, depth, strict=True)]
        grow = [  # a name shared with another workdir (not the same one given twice)
            i
            for i, (label, own) in enumerate(zip(labels, parts, strict=True))
            if depth[i] < len(own)
            and any(other != own and labels[j] == label for j, other in enumerate(parts))
        ]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = f"{label} ({seen[label]})"
    return labels


def curve(records: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of `key` for `split`, in epoch order; the last record of an epoch wins."""
    by_epoch = {
        r["epoch"]: r[key]
        for r in records
        if r.get("split") == split and isinstance(r.get(key), int | float) and "epoch" in r
    }
    epochs = sorted(by_epoch)
    return epochs, [by_epoch[e] for e in epochs]


SPLIT_STYLES = (("train", "-"), ("val", ":"), ("test", "--"))
SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}


def draw_runs(runs: Sequence[tuple[str, list[dict]]]) -> Figure:
    """Loss (left) and accuracy (right) against epoch: solid train, dotted validation (where
    recorded), dashed test, a colour a run. The legend, below both panels, names each run
    once and then the line styles."""
    figure = new_figure(11, 4.5 + 0.25 * len(runs))
    loss_ax, acc_ax = figure.subplots(1, 2)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    recorded = {r.get("split") for _, records in runs for r in records}
    styles = [(split, style) for split, style in SPLIT_STYLES if split in recorded]
    for (_, records), color in zip(runs, colors, strict=True):
        for ax, key in ((loss_ax, "loss"), (acc_ax, "accuracy")):
            for split, style in styles:
                epochs, values = curve(records, split, key)
                if epochs:
                    ax.plot(epochs, values, style, marker="o", markersize=3, color=color)
    loss_ax.set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    acc_ax.set(title="top-1 accuracy", xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02))
    for ax in (loss_ax, acc_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, marker="o", markersize=3) for c in colors]
    handles += [Line2D([], [], color="gray", linestyle=style) for _, style in styles]
    labels = [label for label, _ in runs] + [SPLIT_NAMES[split] for split, _ in styles]
    legend_inside(figure, handles, labels)
    return figure


def legend_inside(figure: Figure, handles: list, labels: list[str]) -> None:
    """A figure legend below the panels with as many columns (up to 4) as fit the figure's
    width; where even one column does not (very long names), the figure is widened."""
    renderer = figure.canvas.get_renderer()
    for ncols in range(min(4, len(labels)), 0, -1):
        legend = figure.legend(handles, labels, loc="outside lower center", ncols=ncols,
                               fontsize="small")  # fmt: skip
        width = legend.get_window_extent(renderer).width + 2 * LEGEND_MARGIN
        if width <= figure.bbox.width or ncols == 1:
            break
        legend.remove()
    if width > figure.bbox.width:
        figure.set_figwidth(width / figure.dpi)


def plot_runs(workdirs: Sequence[PathLike], output: PathLike | None = None) -> Path:
    """Plot the runs in `workdirs` on one figure; returns the PNG's path.

    `output` defaults to `loss_accuracy.png` in the first workdir. Raises UsageError (and
    writes nothing) for a missing workdir or metrics file, or an unwritable output.
    """
    if not workdirs:
        raise cli.UsageError("give at least one workdir")
    files = [find_metrics(w) for w in workdirs]  # every cheap check before any slow work
    output = check_output(files[0].parent / DEFAULT_NAME if output is None else output)
    runs = list(zip(run_labels(workdirs), [read_run(w) for w in workdirs], strict=True))
    return save_png(draw_runs(runs), output)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m flaxcnn.plot",
        description="Plot the loss and accuracy curves (train and test, against epoch) of one "
        "or more training runs on one figure, written as a PNG.",
    )
    parser.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="training workdirs")
    parser.add_argument(
        "--output",
        help=f"PNG to write (default: {DEFAULT_NAME} in the first workdir)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        path = plot_runs(args.workdirs, args.output)
    except cli.UsageError as e:
        cli.fail(str(e))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
