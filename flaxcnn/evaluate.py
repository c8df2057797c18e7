"""`python -m flaxcnn.evaluate --workdir DIR`: a trained checkpoint on the test split.

Restores the best checkpoint of a run (the highest validation accuracy, or test accuracy for
a run without a validation split; else the latest; or the one at --step), rebuilds the
model from the metadata saved with it, and classifies every test example exactly once
(`flaxcnn.data.eval_batches`: padded batches whose padding is masked out). Reports top-1,
top-5 (with more than 5 classes) and per-class accuracy and draws the confusion matrix
(rows: true class, columns: predicted), by default to `DIR/confusion_matrix.png`.

The data and preprocessing are those of training, so top-1 equals the test accuracy the
run logged at that step. Weights converted from torchvision (`flaxcnn.convert`, on
imagenet2012 where it is prepared) go through the same pipeline: the centre square resized
to 224x224, not torchvision's shorter side to 256 and centre crop 224 (which
`flaxcnn.predict` does use), so their top-1 differs a little from torchvision's figure.
One process, one device, one jitted function: evaluating a small test split needs no data
parallelism, and a single device keeps the code obvious.

The run is only read: the checkpoints are opened read-only and the PNG is the one file
written. jax, orbax and the data layer are imported inside the functions that use them, so
that --help and bad arguments answer at once.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from flaxcnn import cli
from flaxcnn.plot import PathLike, check_output, new_figure, save_png

DEFAULT_NAME = "confusion_matrix.png"
DEFAULT_BATCH_SIZE = 128


def build_model(meta: dict, variables: dict | None = None):
    """The network the checkpoint was trained as, without a data-parallel axis; with
    `variables`, checked (abstractly, in a second) to be the ones it takes."""
    import flax
    import jax

    from flaxcnn.training.build import Network

    try:
        network = Network.from_meta(meta)
        model = network.create()
    except (ValueError, TypeError) as e:  # an architecture or option this version lacks
        raise cli.UsageError(str(e).splitlines()[0]) from None
    if variables is not None:
        x = jax.ShapeDtypeStruct(network.input_shape(), jax.numpy.float32)
        try:
            jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
        except flax.errors.FlaxError as e:  # e.g. a layer the weights do not have
            reason = str(e).splitlines()[0].split(" (https://")[0]
            raise cli.UsageError(
                f"the checkpoint's weights do not fit a {meta.get('arch')} network as its "
                f"metadata describes it ({reason})"
            ) from None
    return model


def load_test_split(meta: dict, data_dir: PathLike | None, skip_corrupt: bool = False):
    """The run's data set, checked to have the checkpoint's classes."""
    from flaxcnn import data

    try:
        dataset = data.load(meta["dataset"], data_dir=data_dir, skip_corrupt=skip_corrupt)
    except ValueError as e:  # DatasetNotPrepared is a ValueError too
        raise cli.UsageError(str(e)) from None
    names = [str(c) for c in dataset.info.class_names]
    if names != [str(c) for c in meta["class_names"]]:
        raise cli.UsageError(
            f"data set {meta['dataset']} has classes {names[:5]}... ({len(names)}), the "
            f"checkpoint {meta['class_names'][:5]}... ({meta['num_classes']}): wrong --data-dir?"
        )
    return dataset


def make_classify(model, variables: dict, top: int = 0):
    """A jitted batch -> per-example metrics (`correct`, `loss`, and `correct_top5` with more
    than 5 classes) and the top-1 prediction: the trainer's own evaluation
    (`flaxcnn.training.evaluation`), kept per example; with `top`, also each example's `top`
    most probable classes and their probabilities (`top_classes`, `top_probs`). The
    variables are placed on the device once, not with every batch."""
    import jax
    import jax.numpy as jnp

    from flaxcnn.training import evaluation

    variables = jax.device_put(variables)

    @jax.jit
    def classify(variables, images, labels):
        logits = evaluation.logits(model.apply, variables, images)
        out = {**evaluation.example_metrics(logits, labels), "pred": jnp.argmax(logits, -1)}
        if top:
            probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
            out["top_probs"], out["top_classes"] = jax.lax.top_k(probs, top)
        return out

    return lambda images, labels: classify(variables, images, labels)


def predictions(classify, batches: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`label` and every output of `classify`, for the real (unmasked) examples."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        mask = np.asarray(batch["mask"], bool)
        outputs = {"label": batch["label"], **classify(batch["image"], batch["label"])}
        for key, value in outputs.items():
            parts.setdefault(key, []).append(np.asarray(value)[mask])
    return {key: np.concatenate(values) for key, values in parts.items()}


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
    Returns `step`, `why` (why that checkpoint), `arch`, `dataset`, `num_examples`, `top1`,
    `top5` (None with 5 classes
    or fewer, where it is always 1), `loss`,
    `class_names`, `per_class_accuracy` and `per_class_count` (arrays by class),
    `confusion_matrix` (int64 [true, predicted]) and `output` (the PNG's path or None).
    Raises UsageError, having written nothing, for bad input.
    """
    from flaxcnn.training.rundir import RunDir  # here: it loads jax

    run = RunDir.existing(workdir)
    run.require_checkpoint(step)  # an unknown step fails now, not after seconds of imports
    if output is not None:
        output = check_output(output)
    config = run.read_config()
    if batch_size is None:
        batch_size = config.get("batch_size") or DEFAULT_BATCH_SIZE
    if batch_size < 1:
        raise cli.UsageError(f"--batch-size must be positive, got {batch_size}")
    data_dir = data_dir if data_dir is not None else config.get("data_dir")

    asked = step is not None
    step, meta, variables = run.restore_variables(step)
    why = run.why_checkpoint(step, asked)
    model = build_model(meta, variables)
    dataset = load_test_split(meta, data_dir, bool(config.get("skip_corrupt", False)))
    from flaxcnn import data

    batches = data.eval_batches(
        dataset,
        global_batch_size=batch_size,
        image_size=meta["image_size"],
        channels=meta["in_channels"],
        process_index=0,  # one process reads the whole split
        process_count=1,
    )
    out = predictions(make_classify(model, variables), batches)
    confusion = confusion_matrix(out["label"], out["pred"], meta["num_classes"])
    total = int(confusion.sum())
    if total == 0:
        raise cli.UsageError(f"the test split of {meta['dataset']} is empty")
    top5 = out.get("correct_top5")
    result = {
        "workdir": run.path,
        "step": step,
        "why": why,
        "arch": meta["arch"],
        "dataset": meta["dataset"],
        "num_examples": total,
        "top1": int(np.trace(confusion)) / total,
        "top5": None if top5 is None else int(top5.sum()) / total,
        "loss": float(out["loss"].astype(np.float64).sum()) / total,
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
    """The confusion matrix (`confusion_figure`) as a PNG."""
    return save_png(confusion_figure(result), output)


def confusion_figure(result: dict[str, Any]) -> Figure:
    """The confusion matrix: cells coloured by the row's share, labelled by count.

    Colouring by row (the fraction of a true class predicted as each class) keeps rare
    classes as readable as common ones; counts are written in the cells while they fit.
    `result` needs `confusion_matrix`, `class_names`, `arch`, `dataset`, `step`, `top1`
    and `top5`, as `evaluate_workdir` returns them.
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
        f"top-1 {result['top1']:.4f}"
        + (f", top-5 {result['top5']:.4f}" if result["top5"] is not None else ""),
        fontsize="medium",
    )
    return figure


def report(result: dict[str, Any]) -> list[str]:
    """The lines the CLI prints."""
    lines = [
        f"{result['arch']} on {result['dataset']}: checkpoint step {result['step']}, "
        f"{result['num_examples']} test images",
        f"  checkpoint      {result['why']}",
        f"  top-1 accuracy  {result['top1']:.4f}",
        f"  loss            {result['loss']:.4f}",
        "  per class (accuracy, correct/total):",
    ]
    if result["top5"] is not None:
        lines.insert(3, f"  top-5 accuracy  {result['top5']:.4f}")
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
    cli.run_main(main)
