"""`python -m flaxcnn.evaluate --workdir DIR`: a trained checkpoint on the test split.

Restores the best checkpoint of a run (else the latest, or the one at --step), rebuilds the
model from the metadata saved with it, and classifies every test example exactly once
(`flaxcnn.data.eval_batches`: padded batches whose padding is masked out). Reports top-1,
top-5 and per-class accuracy and draws the confusion matrix (rows: true class, columns:
predicted), by default to `DIR/confusion_matrix.png`.

The data and preprocessing are those of training, so top-1 equals the test accuracy the
run logged at that step. One process, one device, one jitted function: evaluating a small
test split needs no data parallelism, and a single device keeps the code obvious.

The run is only read: the checkpoints are opened read-only and the PNG is the one file
written. jax, orbax and the data layer are imported inside the functions that use them, so
that --help and bad arguments answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from flaxcnn import cli
from flaxcnn.plot import PathLike, check_output, check_workdir, new_figure, save_png

DEFAULT_NAME = "confusion_matrix.png"
DEFAULT_BATCH_SIZE = 128
CHECKPOINTS = "checkpoints"
META_KEYS = ("arch", "num_classes", "class_names", "dataset", "image_size", "in_channels")


def checkpoint_dir(workdir: Path) -> Path:
    """The run's checkpoint directory; UsageError when it holds no checkpoint."""
    directory = workdir / CHECKPOINTS
    if not directory.is_dir() or not steps_on_disk(directory):
        raise cli.UsageError(f"{workdir} has no checkpoint (no {CHECKPOINTS}/<step> in it)")
    return directory


def steps_on_disk(directory: Path) -> list[int]:
    """The step-numbered subdirectories: a quick look, before orbax is imported (seconds)."""
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def run_config(workdir: Path) -> dict:
    """The run's resolved `config.json`, or {} where it is missing or unreadable."""
    try:
        config = json.loads((workdir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def choose_step(steps: list[int], best: int | None, latest: int | None, step: int | None) -> int:
    """`step` when given (it must exist), else the best checkpoint, else the latest."""
    if step is not None:
        if step not in steps:
            listed = ", ".join(map(str, sorted(steps)))
            raise cli.UsageError(f"no checkpoint at step {step}; the run has steps {listed}")
        return step
    chosen = best if best is not None else latest
    if chosen is None:
        raise cli.UsageError("the run has no complete checkpoint")
    return chosen


@contextlib.contextmanager
def absl_errors_only() -> Iterator[None]:
    """Silence absl's warnings for a while: orbax warns that a read-only manager is read-only."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def restore(directory: Path, step: int | None) -> tuple[int, dict, dict]:
    """(step, metadata, variables) of a checkpoint; variables are `params` and `batch_stats`."""
    from flaxcnn.training.checkpoint import Checkpoints

    # orbax warns that a read-only manager will not save, and that reading one item leaves
    # the others unread: both are what is meant here.
    with absl_errors_only():
        ckpts = Checkpoints(directory, read_only=True)
        try:
            all_steps = ckpts.manager.all_steps()
            step = choose_step(all_steps, ckpts.best_step(), ckpts.latest_step(), step)
            meta = ckpts.read_meta(step)
            missing = [k for k in META_KEYS if k not in meta]
            if missing:
                raise cli.UsageError(
                    f"the checkpoint at step {step} lacks {', '.join(missing)} in its metadata"
                )
            state = ckpts.manager.restore(step)["state"]  # as saved: nested dicts of arrays
        finally:
            ckpts.close()
    variables = {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}
    return step, meta, variables


def build_model(meta: dict):
    """The network the checkpoint was trained as, without a data-parallel axis."""
    from flaxcnn import models

    try:
        return models.create(
            meta["arch"],
            num_classes=meta["num_classes"],
            dtype=meta.get("dtype", "float32"),
            **(meta.get("model_options") or {}),
        )
    except ValueError as e:  # an architecture or option this version does not have
        raise cli.UsageError(str(e)) from None


def load_test_split(meta: dict, data_dir: PathLike | None):
    """The run's data set, checked to have the checkpoint's classes."""
    from flaxcnn import data

    try:
        dataset = data.load(meta["dataset"], data_dir=data_dir)
    except ValueError as e:  # DatasetNotPrepared is a ValueError too
        raise cli.UsageError(str(e)) from None
    names = [str(c) for c in dataset.info.class_names]
    if names != [str(c) for c in meta["class_names"]]:
        raise cli.UsageError(
            f"data set {meta['dataset']} has classes {names[:5]}... ({len(names)}), the "
            f"checkpoint {meta['class_names'][:5]}... ({meta['num_classes']}): wrong --data-dir?"
        )
    return dataset


def make_classify(model, variables: dict):
    """A jitted batch -> (top-1 prediction, top-5 hit, negative log-likelihood) per example.

    The same computations as the training loop's `eval_step`, so the numbers agree. The
    variables are placed on the device once, not with every batch.
    """
    import jax
    import jax.numpy as jnp

    from flaxcnn import losses

    variables = jax.device_put(variables)

    @jax.jit
    def classify(variables, images, labels):
        logits = model.apply(variables, images, train=False)
        if isinstance(logits, tuple):  # auxiliary heads, should a model return them
            logits = logits[0]
        top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
        return (
            jnp.argmax(logits, -1),
            jnp.any(top5 == labels[:, None], axis=-1),
            -losses.true_class_log_prob(log_probs, labels),
        )

    return lambda images, labels: classify(variables, images, labels)


def predictions(classify, batches: Iterable[dict[str, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """(labels, predictions, top-5 hits, losses) of the real (unmasked) examples."""
    parts: list[tuple[np.ndarray, ...]] = [
        (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0))
    ]
    for batch in batches:
        pred, hit5, nll = classify(batch["image"], batch["label"])
        mask = np.asarray(batch["mask"], bool)
        parts.append(
            (
                np.asarray(batch["label"], np.int64)[mask],
                np.asarray(pred, np.int64)[mask],
                np.asarray(hit5, bool)[mask],
                np.asarray(nll, np.float64)[mask],
            )
        )
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true class, predicted class] as int64."""
    flat = np.asarray(labels, np.int64) * num_classes + np.asarray(preds, np.int64)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Recall of each class (diagonal over row sums); NaN for a class with no test example."""
    counts = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, np.diag(confusion) / counts, np.nan)


def evaluate_workdir(
    workdir: PathLike,
    *,
    step: int | None = None,
    data_dir: PathLike | None = None,
    batch_size: int | None = None,
    output: PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate a run's checkpoint on its test split; optionally draw the confusion matrix.

    `step` defaults to the best checkpoint (else the latest); `data_dir` and `batch_size`
    to the run's own (`config.json`); `output`, when given, is the confusion-matrix PNG.
    Returns `step`, `arch`, `dataset`, `num_examples`, `top1`, `top5`, `loss`,
    `class_names`, `per_class_accuracy` and `per_class_count` (arrays by class),
    `confusion_matrix` (int64 [true, predicted]) and `output` (the PNG's path or None).
    Raises UsageError, having written nothing, for bad input.
    """
    workdir = check_workdir(workdir)
    directory = checkpoint_dir(workdir)
    if step is not None:  # an unknown step fails now, not after seconds of imports
        choose_step(steps_on_disk(directory), None, None, step)
    if output is not None:
        output = check_output(output)
    config = run_config(workdir)
    if batch_size is None:
        batch_size = config.get("batch_size") or DEFAULT_BATCH_SIZE
    if batch_size < 1:
        raise cli.UsageError(f"--batch-size must be positive, got {batch_size}")
    data_dir = data_dir if data_dir is not None else config.get("data_dir")

    step, meta, variables = restore(directory, step)
    model = build_model(meta)
    dataset = load_test_split(meta, data_dir)
    from flaxcnn import data

    batches = data.eval_batches(
        dataset,
        global_batch_size=batch_size,
        image_size=meta["image_size"],
        channels=meta["in_channels"],
        process_index=0,  # one process reads the whole split
        process_count=1,
    )
    labels, preds, hits5, nll = predictions(make_classify(model, variables), batches)
    confusion = confusion_matrix(labels, preds, meta["num_classes"])
    total = int(confusion.sum())
    if total == 0:
        raise cli.UsageError(f"the test split of {meta['dataset']} is empty")
    result = {
        "workdir": workdir,
        "step": step,
        "arch": meta["arch"],
        "dataset": meta["dataset"],
        "num_examples": total,
        "top1": int(np.trace(confusion)) / total,
        "top5": int(hits5.sum()) / total,
        "loss": float(nll.sum()) / total,
        "class_names": [str(c) for c in meta["class_names"]],
        "per_class_accuracy": per_class_accuracy(confusion),
        "per_class_count": confusion.sum(axis=1),
        "confusion_matrix": confusion,
        "output": None,
    }
    if output is not None:
        result["output"] = plot_confusion(result, output)
    return result


def plot_confusion(result: dict[str, Any], output: PathLike) -> Path:
    """The confusion matrix as a PNG: cells coloured by the row's share, labelled by count.

    Colouring by row (the fraction of a true class predicted as each class) keeps rare
    classes as readable as common ones; counts are written in the cells while they fit.
    """
    confusion = result["confusion_matrix"]
    n = len(confusion)
    side = min(max(4.0, 0.45 * n + 2.5), 24.0)
    figure = new_figure(side + 1.2, side)
    ax = figure.subplots()
    rows = confusion.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(rows > 0, confusion / np.maximum(rows, 1), 0.0)
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    if n <= 50:
        names = result["class_names"]
        ax.set_xticks(range(n), names, rotation=90 if max(map(len, names)) > 2 else 0)
        ax.set_yticks(range(n), names)
    if n <= 30:
        for (i, j), count in np.ndenumerate(confusion):
            if count:
                color = "white" if share[i, j] > 0.5 else "black"
                ax.text(j, i, str(count), ha="center", va="center", fontsize=8, color=color)
    ax.set(xlabel="predicted class", ylabel="true class")
    ax.set_title(
        f"{result['arch']} on {result['dataset']}, step {result['step']}: "
        f"top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f}",
        fontsize="medium",
    )
    return save_png(figure, output)


def report(result: dict[str, Any]) -> list[str]:
    """The lines the CLI prints."""
    lines = [
        f"{result['arch']} on {result['dataset']}: checkpoint step {result['step']}, "
        f"{result['num_examples']} test images",
        f"  top-1 accuracy  {result['top1']:.4f}",
        f"  top-5 accuracy  {result['top5']:.4f}",
        f"  loss            {result['loss']:.4f}",
        "  per class (accuracy, correct/total):",
    ]
    width = max(map(len, result["class_names"]))
    confusion = result["confusion_matrix"]
    for i, name in enumerate(result["class_names"]):
        count = int(result["per_class_count"][i])
        acc = result["per_class_accuracy"][i]
        shown = f"{acc:.4f}" if count else "   n/a"
        lines.append(f"    {name:<{width}}  {shown}  {int(confusion[i, i])}/{count}")
    if result["output"] is not None:
        lines.append(f"confusion matrix: {result['output']}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m flaxcnn.evaluate",
        description="Evaluate a training run's checkpoint on the test split: top-1, top-5 and "
        "per-class accuracy, and a confusion-matrix PNG.",
    )
    parser.add_argument("--workdir", required=True, help="the training run's workdir")
    parser.add_argument(
        "--step", type=int, help="checkpoint step (default: the best, else the latest)"
    )
    parser.add_argument(
        "--data-dir", help="where the data set is prepared (default: the run's, else TFDS's)"
    )
    parser.add_argument(
        "--batch-size", type=int, help="examples per batch (default: the run's --batch-size)"
    )
    parser.add_argument(
        "--output", help=f"confusion-matrix PNG (default: {DEFAULT_NAME} in the workdir)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    output = args.output if args.output is not None else Path(args.workdir) / DEFAULT_NAME
    try:
        result = evaluate_workdir(
            args.workdir,
            step=args.step,
            data_dir=args.data_dir,
            batch_size=args.batch_size,
            output=output,
        )
    except cli.UsageError as e:
        cli.fail(str(e))
    print("\n".join(report(result)))


if __name__ == "__main__":
    sys.exit(main())
