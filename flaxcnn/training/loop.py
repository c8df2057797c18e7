"""The training loop, as the algorithm reads:

    for each epoch:
        for each global batch:  forward, loss, backward, average gradients, update
        log the epoch's training loss and accuracy
        evaluate on the test split, log, checkpoint

`train(config)` is the whole job, callable from a notebook; `flaxcnn.train` is its CLI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from flaxcnn import data, models
from flaxcnn.cli import UsageError
from flaxcnn.models import summary
from flaxcnn.training import distributed, optim, parallel, steps
from flaxcnn.training.checkpoint import BEST_METRIC, Checkpoints
from flaxcnn.training.config import TrainConfig
from flaxcnn.training.metrics import MetricsWriter
from flaxcnn.training.state import TrainState, create_state

SMALL_INPUT_MAX = 64  # at or below this side, use a model's small-input stem if it has one
EXIT_INTERRUPTED = 130


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. a non-finite loss); the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything resolved from the config and the data before the first step."""

    config: TrainConfig
    dataset: data.Dataset
    spec: models.ModelSpec
    model_options: dict[str, Any]
    image_size: int
    workdir: Path
    steps_per_epoch: int
    total_steps: int
    peak_lr: float
    weight_decay: float


def resolve_input(
    spec: models.ModelSpec, native: int, requested: int | None
) -> tuple[int, dict[str, Any]]:
    """The input side and the model options for it, for images `native` pixels a side.

    By default the images' own size, raised to what the model needs; images of at most
    SMALL_INPUT_MAX pixels use the model's small-input stem (e.g. ResNet's 3x3 stride-1 stem
    without max-pool), which keeps 32x32-class images from being downsampled to nothing.
    """
    size = requested or native
    small = bool(spec.small_input_options) and size <= SMALL_INPUT_MAX < spec.input_size
    if requested is None and not small:
        # Networks designed for small images (LeNet's 32x32) get their design size; the
        # others the smallest size they accept (VGG: 32, AlexNet: 63), not 224.
        design = spec.input_size if spec.input_size <= SMALL_INPUT_MAX else spec.min_size
        size = max(size, design)
    return size, dict(spec.small_input_options) if small else {}


def default_workdir(config: TrainConfig) -> Path:
    dataset = config.dataset.split(":", 1)[0] if ":" in config.dataset else config.dataset
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.arch}-{dataset}-{stamp}"


def prepare(config: TrainConfig) -> Setup:
    """Validate everything that can be validated before touching the workdir."""
    config.validate()
    spec = get_spec(config.arch)
    try:
        dataset = data.load(config.dataset, data_dir=config.data_dir)
    except ValueError as e:  # DatasetNotPrepared is a ValueError too
        raise UsageError(str(e)) from None
    # A data set of images of varying sizes records 0: the model's design size then.
    native = max(dataset.info.image_shape[:2]) or spec.input_size
    image_size, options = resolve_input(spec, native, config.image_size)
    if config.dropout is not None:
        if "dropout_rate" not in models.options(config.arch):
            raise UsageError(f"{config.arch} has no dropout; leave out --dropout")
        options["dropout_rate"] = config.dropout
    devices = jax.device_count()
    if config.batch_size % devices:
        raise UsageError(
            f"--batch-size {config.batch_size} does not divide evenly over {devices} devices"
        )
    num_train = dataset.info.num_train
    if config.batch_size > num_train:
        raise UsageError(
            f"--batch-size {config.batch_size} is larger than the training split ({num_train})"
        )
    if jax.process_count() > 1 and config.workdir is None:
        raise UsageError("with several processes, give every process the same --workdir")
    steps_per_epoch = num_train // config.batch_size
    base_lr = config.lr if config.lr is not None else optim.DEFAULT_LR[config.optimizer]
    wd = config.weight_decay
    return Setup(
        config=config,
        dataset=dataset,
        spec=spec,
        model_options=options,
        image_size=image_size,
        workdir=Path(config.workdir) if config.workdir else default_workdir(config),
        steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * config.epochs,
        peak_lr=optim.scaled_lr(base_lr, config.batch_size),
        weight_decay=optim.DEFAULT_WEIGHT_DECAY[config.optimizer] if wd is None else wd,
    )


def get_spec(arch: str) -> models.ModelSpec:
    try:
        return models.get_spec(arch)
    except ValueError as e:
        raise UsageError(str(e)) from None


def build_model(setup: Setup, axis_name: str | None):
    return models.create(
        setup.config.arch,
        num_classes=setup.dataset.info.num_classes,
        dtype=setup.config.dtype,
        axis_name=axis_name,
        **setup.model_options,
    )


def input_shape(setup: Setup, batch: int = 1) -> tuple[int, int, int, int]:
    return (batch, setup.image_size, setup.image_size, setup.spec.in_channels)


def run_meta(setup: Setup) -> dict:
    """What a checkpoint must agree with to be resumed or used by --init-from."""
    return {
        "arch": setup.config.arch,
        "num_classes": setup.dataset.info.num_classes,
        "class_names": list(setup.dataset.info.class_names),
        "dataset": setup.config.dataset,
        "image_size": setup.image_size,
        "in_channels": setup.spec.in_channels,
        "model_options": setup.model_options,
        "dtype": setup.config.dtype,
    }


def inspect_workdir(workdir: Path, checkpoints: Path, config: TrainConfig) -> bool:
    """Whether to resume; refuses (UsageError) anything that would damage an existing run.

    Reads only: nothing is created or written until every check has passed.
    """
    has_checkpoint = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
    if workdir.exists() and not workdir.is_dir():
        raise UsageError(f"--workdir {workdir} exists and is not a directory")
    if has_checkpoint and config.resume is False:
        raise UsageError(
            f"{workdir} already holds checkpoints; choose another --workdir, or --resume"
        )
    if config.resume and not has_checkpoint:
        raise UsageError(f"--resume: {workdir} has no checkpoint to resume from")
    previous = workdir / "config.json"
    if previous.exists():
        try:
            arch = json.loads(previous.read_text()).get("arch")
        except (OSError, json.JSONDecodeError):
            arch = None
        if arch not in (None, config.arch):
            raise UsageError(
                f"{workdir} holds a {arch} run, not {config.arch}; choose another --workdir"
            )
    return has_checkpoint


def make_workdir(workdir: Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to --workdir {workdir}: {e.strerror}") from None


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def host_tree(state: TrainState) -> dict:
    """The checkpointed part of a state, as nested dicts of numpy arrays."""
    return jax.tree.map(np.asarray, serialization.to_state_dict(state))


def load_init_from(path: str, setup: Setup, state: TrainState) -> tuple[TrainState, list[str]]:
    """Params and BatchNorm statistics from another run of the same architecture.

    Leaves whose shape differs (the classifier, when the class count changes) keep their
    fresh initialisation; their names are returned.
    """
    source = Path(path)
    directory = source / "checkpoints" if (source / "checkpoints").is_dir() else source
    if not directory.is_dir():
        raise UsageError(f"--init-from {path}: no such directory")
    ckpts = Checkpoints(directory, read_only=True)
    step = ckpts.best_step()
    step = ckpts.latest_step() if step is None else step
    if step is None:
        raise UsageError(f"--init-from {path}: no checkpoint found there")
    meta = ckpts.read_meta(step)
    if meta.get("arch") != setup.config.arch:
        raise UsageError(
            f"--init-from {path} holds a {meta.get('arch')} checkpoint, not {setup.config.arch}"
        )
    restored = ckpts.manager.restore(step)["state"]  # structure as saved, no template
    ckpts.close()
    replaced: list[str] = []

    def take(path_, fresh, loaded):
        if loaded is not None and np.shape(loaded) == np.shape(fresh):
            return np.asarray(loaded, dtype=np.asarray(fresh).dtype)
        replaced.append(jax.tree_util.keystr(path_))
        return np.asarray(fresh)

    def merge(fresh_tree, loaded_tree):
        flat_loaded = {
            jax.tree_util.keystr(p): v
            for p, v in jax.tree_util.tree_flatten_with_path(loaded_tree)[0]
        }
        return jax.tree_util.tree_map_with_path(
            lambda p, v: take(p, v, flat_loaded.get(jax.tree_util.keystr(p))), fresh_tree
        )

    params = merge(serialization.to_state_dict(state.params), restored.get("params", {}))
    stats = merge(serialization.to_state_dict(state.batch_stats), restored.get("batch_stats", {}))
    state = state.replace(
        params=serialization.from_state_dict(state.params, params),
        batch_stats=serialization.from_state_dict(state.batch_stats, stats),
        opt_state=state.tx.init(serialization.from_state_dict(state.params, params)),
    )
    return state, replaced


def accumulate(total: dict | None, new: dict) -> dict:
    """Running sums, except the first non-finite step, which is a running minimum."""
    if total is None:
        return new
    return {
        k: (jnp.minimum if k == steps.FIRST_NONFINITE else jnp.add)(total[k], v)
        for k, v in new.items()
    }


def means(sums: dict[str, float]) -> dict[str, float]:
    count = max(sums["count"], 1.0)
    out = {"loss": sums["loss"] / count, "accuracy": sums["correct"] / count}
    if "correct_top5" in sums:
        out["top5_accuracy"] = sums["correct_top5"] / count
    return out


class StopRequest:
    """SIGTERM/SIGINT: finish the current step, save, and exit saying how to resume.

    Several processes must stop after the same step (one that stops alone leaves the
    others waiting in a collective for ever), so `due` is their agreement, taken where
    the loop waits for the devices anyway; a signal to any process stops them all.
    """

    def __init__(self):
        self.signal: int | None = None
        self.agreed: int | None = None  # the signal that every process stops on

    def due(self, sync_point: bool) -> bool:
        """Whether to stop now: the same answer on every process."""
        if self.agreed is None and (sync_point or jax.process_count() == 1):
            self.agreed = distributed.any_signal(self.signal)
        return self.agreed is not None

    def __call__(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def evaluate(par: parallel.DataParallel, dstate, setup: Setup) -> dict[str, float]:
    total = None
    for batch in data.eval_batches(
        setup.dataset,
        global_batch_size=setup.config.batch_size,
        image_size=setup.image_size,
        channels=setup.spec.in_channels,
    ):
        total = accumulate(total, par.eval_step(dstate, par.put_batch(batch)))
    return means(par.get_metrics(total))


def header(setup: Setup, params: int, resumed_from: int | None) -> list[str]:
    c, info = setup.config, setup.dataset.info
    devices, local = jax.device_count(), jax.local_device_count()
    kind = jax.devices()[0].platform
    stem = ", small-input stem" if setup.model_options.get("small_stem") else ""
    lines = [
        f"flaxcnn: {c.arch} on {info.name} ({info.num_classes} classes, "
        f"{info.num_train} train / {info.num_test} test images)",
        f"  parameters   {params:,}",
        f"  devices      {devices} x {kind} ({jax.process_count()} process(es), {local} local)",
        f"  batch        {c.batch_size} global, {c.batch_size // devices} per device, "
        f"{setup.steps_per_epoch} steps per epoch",
        f"  image size   {setup.image_size}x{setup.image_size}x{setup.spec.in_channels}{stem}",
        f"  dtype        {c.dtype} compute, float32 parameters",
        f"  optimizer    {c.optimizer}, lr {setup.peak_lr:g} (= base x {c.batch_size}/256), "
        f"{c.schedule} schedule, weight decay {setup.weight_decay:g}",
        f"  parallel     {c.parallel}",
        f"  workdir      {setup.workdir}",
    ]
    if resumed_from is not None:
        lines.append(f"  resuming     from step {resumed_from}")
    return lines


def train(config: TrainConfig, out: Callable[[str], None] = print) -> dict[str, float]:
    """Run (or resume) a training job; returns the final test metrics.

    Raises UsageError for bad configuration or input (nothing written in that case) and
    TrainingError when training cannot go on.
    """
    distributed.initialize(config)
    setup = prepare(config)
    primary = jax.process_index() == 0
    ckpt_dir = setup.workdir / "checkpoints"
    resume = inspect_workdir(setup.workdir, ckpt_dir, config)

    model = build_model(setup, axis_name=steps.AXIS)
    schedule = optim.make_schedule(
        config.schedule,
        setup.peak_lr,
        setup.total_steps,
        round(config.warmup_epochs * setup.steps_per_epoch),
    )
    tx = optim.make_optimizer(config.optimizer, schedule, setup.weight_decay)
    try:
        state = create_state(build_model(setup, None), tx, input_shape(setup), config.seed)
    except ValueError as e:  # e.g. an --image-size below the model's minimum
        raise UsageError(str(e)) from None
    state = state.replace(apply_fn=model.apply)
    meta = run_meta(setup)
    replaced: list[str] = []
    if config.init_from and not resume:
        state, replaced = load_init_from(config.init_from, setup, state)

    make_workdir(setup.workdir)
    ckpts = Checkpoints(ckpt_dir, keep=config.keep_checkpoints)
    start_step, carried, data_state = 0, None, None
    if resume:
        saved = ckpts.read_meta()
        for key in ("arch", "num_classes", "image_size", "in_channels"):
            if saved.get(key) != meta[key]:
                raise UsageError(
                    f"the checkpoint in {ckpt_dir} has {key}={saved.get(key)}, this run "
                    f"{meta[key]}; choose another --workdir"
                )
        restored, data_state, saved = ckpts.restore(host_tree(state))
        state = serialization.from_state_dict(state, restored)
        start_step = int(state.step)
        carried = saved.get("epoch_sums")
    if replaced and primary:
        out(f"--init-from: re-initialised {', '.join(replaced)} (shape differs)")

    if primary:
        write_json_atomic(setup.workdir / "config.json", resolved_config(setup))
    writer = MetricsWriter(setup.workdir, enabled=primary, resume_step=start_step)
    params = summary.tree_size(state.params)
    if primary:
        for line in header(setup, params, start_step if resume else None):
            out(line)

    pipeline = data.TrainPipeline(
        setup.dataset,
        global_batch_size=config.batch_size,
        image_size=setup.image_size,
        channels=setup.spec.in_channels,
        seed=config.seed,
        augment=True,
        worker_count=config.workers,
    )
    batches = iter(pipeline)
    if data_state is not None:
        batches.set_state(data_state)

    par = parallel.make(config.parallel, config.label_smoothing)
    dstate = par.put_state(state)
    del state
    stop = StopRequest()
    test_metrics: dict[str, float] = {}
    try:
        with stop.installed():
            dstate, test_metrics = _loop(
                setup, par, dstate, batches, schedule, ckpts, writer, meta,
                start_step, carried, stop, out, primary,
            )  # fmt: skip
    finally:
        writer.close()
        ckpts.close()
        if hasattr(batches, "close"):
            batches.close()
    return test_metrics


def resolved_config(setup: Setup) -> dict:
    c = setup.config
    resolved = dataclasses.replace(
        c,
        workdir=str(setup.workdir),
        data_dir=str(c.data_dir or data.default_data_dir()),
        image_size=setup.image_size,
        lr=c.lr if c.lr is not None else optim.DEFAULT_LR[c.optimizer],
        weight_decay=setup.weight_decay,
        checkpoint_every=c.checkpoint_every or setup.steps_per_epoch,
    )
    return {
        **resolved.to_json(),
        "peak_lr": setup.peak_lr,
        "steps_per_epoch": setup.steps_per_epoch,
        "total_steps": setup.total_steps,
        "model_options": setup.model_options,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "jax_version": jax.__version__,
    }


def _loop(
    setup: Setup,
    par: parallel.DataParallel,
    dstate,
    batches: Iterator[dict[str, np.ndarray]],
    schedule,
    ckpts: Checkpoints,
    writer: MetricsWriter,
    meta: dict,
    step: int,
    carried: dict | None,
    stop: StopRequest,
    out: Callable[[str], None],
    primary: bool,
):
    from tqdm.auto import tqdm

    config = setup.config
    spe, total = setup.steps_per_epoch, setup.total_steps
    every = config.checkpoint_every or spe
    test: dict[str, float] = {}
    show = config.progress and primary

    def epoch_sums(acc) -> dict[str, float]:
        sums = par.get_metrics(acc) if acc is not None else dict(carried or {})
        bad = sums.get(steps.FIRST_NONFINITE, steps.ALL_FINITE)
        if bad < steps.ALL_FINITE:
            raise TrainingError(
                f"the loss became non-finite at step {int(bad)}; the last good checkpoint is "
                f"kept in {ckpts.directory}: lower --lr or check the data"
            )
        return sums

    def save(metrics: dict | None, sums: dict | None) -> None:
        host = host_tree(par.get_state(dstate))
        ckpts.save(step, host, batches.get_state(), {**meta, "epoch_sums": sums}, metrics)

    if step >= total:
        test = evaluate(par, dstate, setup)
    while step < total:
        epoch = step // spe
        acc = None
        start = time.perf_counter()
        first = step
        bar = tqdm(
            total=spe, initial=step % spe, desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not show, leave=False, file=sys.stdout, dynamic_ncols=True,
        )  # fmt: skip
        while step < (epoch + 1) * spe:
            dstate, metrics = par.train_step(dstate, par.put_batch(next(batches)))
            if acc is None and carried:
                # Resumed mid-epoch: continue the float32 sums exactly where they stopped,
                # so the epoch's numbers are bit-identical to an uninterrupted run's.
                acc = jax.tree.map(lambda m, c: jnp.full_like(m, np.float32(c)), metrics, carried)
            acc = accumulate(acc, metrics)
            step += 1
            bar.update()
            if step % config.log_every == 0 or step % spe == 0:
                sums = epoch_sums(acc)
                elapsed = time.perf_counter() - start
                bar.set_postfix(
                    loss=f"{sums['loss'] / sums['count']:.4f}",
                    acc=f"{sums['correct'] / sums['count']:.4f}",
                    img_s=f"{(step - first) * config.batch_size / elapsed:.0f}",
                )
            if stop.due(step % config.log_every == 0 or step % spe == 0):
                break
            if step % every == 0 and step % spe and step < total:
                save(None, epoch_sums(acc))
        bar.close()
        if stop.agreed is not None and step % spe:
            save(None, epoch_sums(acc))
            raise_interrupted(stop.agreed, step, setup, out, primary)
        elapsed = time.perf_counter() - start
        sums = epoch_sums(acc)
        carried = None
        record = {
            "split": "train",
            "epoch": epoch + 1,
            "step": step,
            **means(sums),
            "lr": float(schedule(step - 1)),
            "images_per_sec": (step - first) * config.batch_size / elapsed,
        }
        writer.write(record)
        metrics = None
        last = step == total
        if (epoch + 1) % config.eval_every == 0 or last:
            test = evaluate(par, dstate, setup)
            writer.write({"split": "test", "epoch": epoch + 1, "step": step, **test})
            metrics = {BEST_METRIC: test["accuracy"]}
        if primary:
            line = f"epoch {epoch + 1}/{config.epochs}  train loss {record['loss']:.4f}  "
            line += f"acc {record['accuracy']:.4f}  {record['images_per_sec']:.0f} img/s"
            if metrics:
                line += f"  |  test loss {test['loss']:.4f}  acc {test['accuracy']:.4f}"
            out(line)
        stopping = stop.due(sync_point=True)
        if step % every == 0 or last or stopping:
            save(metrics, None)
        if stopping and not last:
            raise_interrupted(stop.agreed, step, setup, out, primary)
    if primary:
        out(f"test accuracy: {test['accuracy']:.4f}")
    return dstate, test


def raise_interrupted(signum: int, step: int, setup: Setup, out, primary: bool) -> None:
    name = signal.Signals(signum).name
    if primary:
        out(
            f"{name} at step {step}: checkpoint saved. Resume with: "
            f"python -m flaxcnn.train --arch {setup.config.arch} --workdir {setup.workdir}"
        )
    raise SystemExit(128 + signum if signum != signal.SIGINT else EXIT_INTERRUPTED)
