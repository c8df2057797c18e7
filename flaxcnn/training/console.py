"""What a run prints: the header, one line per epoch, and a progress bar.

Results go to `out` (stdout by default), one line each, so that a redirected log reads
like the screen. The progress bar goes to stderr, and only when stderr is a terminal: a
log file gets no carriage-return updates.
"""

from __future__ import annotations

import sys
from typing import Any

import jax

from flaxcnn.data.transforms import crop_padding
from flaxcnn.training.optim import OptimizerSettings
from flaxcnn.training.resolve import DEFAULT_BATCH_SIZE, SMALL_SPLIT, Setup


def header(setup: Setup, resumed_from: int | None) -> list[str]:
    c, info, net, opt = setup.config, setup.dataset.info, setup.network, setup.optimizer
    best = {
        "val_accuracy": "the best checkpoint is the one of the best validation accuracy",
        "latest": "the best checkpoint is the latest (nothing is chosen on the test split)",
        "test_accuracy": "the best checkpoint is the one of the best test accuracy, as this "
        "run did before validation splits",
    }[setup.best_by]
    devices, local = jax.device_count(), jax.local_device_count()
    kind = jax.devices()[0].platform
    stem = ", small-input stem" if net.options.get("small_stem") else ""
    chosen = (
        f" (chosen for {info.num_train} training images; --batch-size to change)"
        if setup.batch_size_chosen and setup.batch_size != DEFAULT_BATCH_SIZE
        else ""
    )
    options = {k: v for k, v in net.options.items() if k != "small_stem"}
    lines = [
        f"flaxcnn: {c.arch} on {info.name} ({info.num_classes} classes, "
        f"{info.num_train} train / "
        + (f"{info.num_val} val / " if info.num_val else "")
        + f"{info.num_test} test images)",
        f"  splits       {splits(info, c.val_fraction)}: {best}",
        f"  parameters   {setup.params:,}",
        f"  devices      {devices} x {kind} ({jax.process_count()} process(es), {local} local)",
        f"  batch        {setup.batch_size} global, {setup.batch_size // devices} per device, "
        f"{setup.steps_per_epoch} steps per epoch{chosen}",
        f"  image size   {net.image_size}x{net.image_size}x{net.in_channels}{stem}",
        f"  augment      {augmentation(c.augment, net.image_size)}{small_split_note(setup)}",
        f"  dtype        {c.dtype} compute, float32 parameters",
        f"  optimizer    {opt.name}, lr {opt.peak_lr:g} ({lr_rule(setup.batch_size, opt)}), "
        f"{opt.schedule} schedule, weight decay {opt.weight_decay:g}",
        f"  parallel     {c.parallel}",
        f"  workdir      {setup.workdir}",
    ]
    if options:
        listed = ", ".join(f"{k}={v}" for k, v in options.items())
        lines.insert(8, f"  options      {listed}")
    if c.init_from:
        frozen = (
            "; backbone frozen: only the classifier trains, the rest in inference mode "
            "(BatchNorm statistics kept, no dropout, no precise BN)"
            if c.freeze_backbone
            else ""
        )
        lines.append(f"  init from    {c.init_from}{frozen}")
    if resumed_from is not None:
        lines.append(f"  resuming     from step {resumed_from}")
    return lines


def splits(info: Any, val_fraction: float) -> str:
    """Where the validation split comes from."""
    if info.val_source == "own":
        return f"{info.num_val} validation images (the data set's own split)"
    if info.num_val:
        return f"{info.num_val} validation images ({val_fraction:g} of the training split)"
    return "no validation split (--val-fraction 0)"


def lr_rule(batch_size: int, opt: OptimizerSettings) -> str:
    """How the peak rate came from --lr: linear in the batch, held below LR_MIN_BATCH."""
    if batch_size >= opt.lr_min_batch:
        return f"= base x {batch_size}/256"
    return f"= base x {opt.lr_min_batch}/256: a batch below {opt.lr_min_batch} takes its rate"


def small_split_note(setup: Setup) -> str:
    """That no augmentation is the default for a small training split."""
    if setup.config.augment == "none" and setup.dataset.info.num_train < SMALL_SPLIT:
        return f" (the default under {SMALL_SPLIT} training images; --augment to change)"
    return ""


def augmentation(augment: str, image_size: int) -> str:
    """The resolved --augment value, and what it does at this input size."""
    crop = f"random shifts by up to {crop_padding(image_size)} px"
    said = {"none": "", "crop": f" ({crop})", "crop+flip": f" ({crop}, horizontal flips)"}
    return augment + said[augment]


def epoch_line(
    setup: Setup,
    train: dict[str, Any],
    test: dict[str, float] | None,
    val: dict[str, float] | None = None,
) -> str:
    line = (
        f"epoch {train['epoch']}/{setup.config.epochs}  train loss {train['loss']:.4f}  "
        f"acc {train['accuracy']:.4f}  {train['images_per_sec']:.0f} img/s"
    )
    if val:
        line += f"  |  val loss {val['loss']:.4f}  acc {val['accuracy']:.4f}"
    if test:
        line += f"  |  test loss {test['loss']:.4f}  acc {test['accuracy']:.4f}"
    return line


def progress_bar(setup: Setup, epoch: int, done: int, enabled: bool):
    """A tqdm bar for one epoch on stderr, shown on a terminal or in a notebook only."""
    from tqdm.auto import tqdm

    # A notebook's stderr is no terminal, but tqdm.auto draws a widget there.
    show = enabled and (sys.stderr.isatty() or "ipykernel" in sys.modules)
    return tqdm(
        total=setup.steps_per_epoch, initial=done, desc=f"epoch {epoch + 1}/{setup.config.epochs}",
        disable=not show, leave=False, file=sys.stderr, dynamic_ncols=True,
    )  # fmt: skip
