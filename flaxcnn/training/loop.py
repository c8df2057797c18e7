"""The training loop, as the algorithm reads:

    for each epoch:
        for each global batch:  forward, loss, backward, average gradients, update
        log the epoch's training loss and accuracy
        evaluate on the test split (BatchNorm statistics recomputed first), log, checkpoint

`train(config)` is the whole job, callable from a notebook; `flaxcnn.train` is its CLI.
It raises `UsageError` for bad input (nothing written), `NonFiniteLoss` when the loss
diverges and `Interrupted` after saving when a signal stops it (see `errors.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

from flaxcnn import data
from flaxcnn.cli import UsageError
from flaxcnn.data.transforms import DEFAULT_AUGMENT, resolve_augment
from flaxcnn.models.parsing import parse_options
from flaxcnn.training import (
    console,
    distributed,
    freeze,
    metrics,
    parallel,
    precise_bn,
    resolve,
    resume,
    steps,
    warm_start,
)
from flaxcnn.training.build import create_train_state
from flaxcnn.training.checkpoint import (
    TEST_METRIC,
    VAL_METRIC,
    CheckpointWriteError,
    NoIntactCheckpoint,
)
from flaxcnn.training.config import TrainConfig
from flaxcnn.training.errors import Interrupted, NonFiniteLoss, TrainingError
from flaxcnn.training.evaluation import means
from flaxcnn.training.metrics import EpochSums
from flaxcnn.training.resolve import Setup, canonical_dataset, prepare, resolved_config
from flaxcnn.training.rundir import RunDir
from flaxcnn.training.signals import StopRequest
from flaxcnn.training.state import TrainState

# What a resumed run must share with its checkpoint for the state to mean the same thing.
RESUME_KEYS = ("arch", "num_classes", "image_size", "in_channels", "model_options")


def train(
    config: TrainConfig,
    out: Callable[[str], None] = print,
    explicit: Collection[str] | None = None,
) -> dict[str, float]:
    """Run (or resume) a training job; returns the final test metrics.

    Resuming (the workdir has a checkpoint), the run's config.json supplies every setting;
    `explicit` names the settings the caller gave (the CLI's flags; by default those that
    differ from TrainConfig's defaults), which must agree with it (see `resume.py`).
    """
    config, previous, changes = resume_settings(config, explicit)  # files only, no devices
    distributed.initialize(config)
    source = None  # a bad --init-from is refused before the data are even read
    if config.init_from and previous is None:  # not resuming: the source is where it starts
        source = warm_start.locate(config.init_from, config.arch)
    setup = prepare(config, previous)
    run = RunDir(setup.workdir)
    resuming = run.check_start(config.arch, config.resume)
    if not resuming and config.resume is None and run.read_config().get("arch"):
        out(  # (with --no-resume, it is started again with the settings given)
            f"note: {run.path} has no checkpoint (its run stopped before the first save): "
            "starting it again from step 0 with the settings in its config.json"
        )
    if resuming and previous:
        changed = resume.data_changes(previous.get("data"), setup.dataset.info)
        if changed and not config.accept_new_data:
            raise UsageError(
                f"the data of {config.dataset} changed since the run in {run.path} started "
                f"({'; '.join(changed)}): resume with --accept-new-data to continue on the "
                "new data, or start a new --workdir"
            )
        if changed:
            changes["data"] = changed
    loaded, fresh = None, []
    if resuming:
        source = None  # the run's own checkpoint is where it continues
    elif source is not None:
        warm_start.check_options(config.init_from, source[1], setup.network)
        loaded = warm_start.read(source[0])
        fresh = warm_start.fresh_names(loaded, setup.shapes)
    trainable = None
    if config.freeze_backbone:
        trainable = freeze.trainable(setup.network, setup.shapes["params"], fresh)

    run.create()
    primary = jax.process_index() == 0
    with run.locked() if primary else contextlib.nullcontext():  # one run per workdir
        tx, schedule = build_optimizer(setup, trainable)
        state = create_train_state(setup.network, tx, config.seed)
        replaced: list[str] = []
        if loaded is not None:
            state, replaced = warm_start.load(loaded, state)
        history = (previous, changes) if resuming else None
        with Trainer(setup, run, state, schedule, history, out, trainable) as trainer:
            if replaced:
                trainer.out(f"--init-from: re-initialised {', '.join(replaced)} (shape differs)")
            return trainer.fit()


def checkpoint_metrics(best_by: str, results: dict[str, dict[str, float]]) -> dict | None:
    """What a checkpoint records to be ranked by (`checkpoint.selection_metric`): validation
    and test accuracy; test accuracy alone for a run from before validation splits; nothing
    without a validation split (the latest is then the best)."""
    if best_by == "val_accuracy":
        return {VAL_METRIC: results["val"]["accuracy"], TEST_METRIC: results["test"]["accuracy"]}
    if best_by == "test_accuracy":
        return {TEST_METRIC: results["test"]["accuracy"]}
    return None


def build_optimizer(setup: Setup, trainable: Any = None):
    """(optax transformation, learning-rate schedule) for the run; with a --freeze-backbone
    mask, only the trainable parameters are updated."""
    tx, schedule = setup.optimizer.build()
    if trainable is not None:
        tx = freeze.mask_optimizer(tx, trainable)
    return tx, schedule


def resume_settings(
    config: TrainConfig, explicit: Collection[str] | None
) -> tuple[TrainConfig, dict | None, dict]:
    """(the config to run, the stored config.json, the changed settings) for `config`.

    A workdir with a checkpoint and a config.json is resumed from its settings. One with a
    config.json but no checkpoint (its run stopped before the first save) starts again from
    step 0 with its settings, checked the same way (the stored config is then None).
    Otherwise `config` is used as it is.
    """
    run = RunDir(config.workdir) if config.workdir else None
    if run is None or config.resume is False:
        return config, None, {}
    stored = run.read_config()
    if not run.has_checkpoint():
        if config.resume or not stored.get("arch") or stored.get("converted_from"):
            return config, None, {}  # a fresh start: check_start refuses what it must
        merged, _ = _reconcile(run, stored, config, explicit)
        return dataclasses.replace(merged, resume=None), None, {}
    if stored.get("converted_from"):
        raise UsageError(
            f"{run.path} holds converted weights, not a training run: start a run from them "
            f"with --init-from {run.path} and another --workdir"
        )
    if not stored.get("arch"):
        raise UsageError(
            f"{run.path} holds checkpoints but no readable config.json with its settings, so "
            "a resume could not be checked against them; choose another --workdir"
        )
    merged, changes = _reconcile(run, stored, config, explicit)
    return merged, stored, changes


def _reconcile(
    run: RunDir, stored: dict, config: TrainConfig, explicit: Collection[str] | None
) -> tuple[TrainConfig, dict]:
    """The stored settings with the allowed changes in `config` (resume.reconcile)."""
    stored = {**resume.LEGACY, **stored}  # settings older runs did not record: as they ran
    explicit = resume.explicit_fields(config) if explicit is None else set(explicit)
    dataset = stored.get("dataset")

    def normalise(name: str, value):
        if name == "dataset":
            return canonical_dataset(value)
        if name == "data_dir" and value is not None:
            return str(Path(value).expanduser().absolute())
        if name == "model_options" and value:
            try:
                return parse_options(stored["arch"], value)
            except ValueError as e:
                raise UsageError(str(e)) from None
        if name == "augment" and value == DEFAULT_AUGMENT and isinstance(dataset, str):
            return resolve_augment(value, data.flips_keep_labels(dataset))
        return value

    stored["augment"] = normalise("augment", stored["augment"])  # an older run's "default"
    return resume.reconcile(stored, config, explicit, normalise)


class Trainer:
    """One run in progress: the placed state, the data, and where everything is written."""

    def __init__(
        self,
        setup: Setup,
        run: RunDir,
        state: TrainState,
        schedule,
        history: tuple[dict | None, dict] | None,
        out: Callable[[str], None],
        trainable: Any = None,
    ):
        """`history` is (the stored config.json, the changed settings) when resuming;
        `trainable` the --freeze-backbone mask (None: everything trains)."""
        self.config = setup.config
        self.setup, self.run, self.schedule = setup, run, schedule
        self.trainable = trainable
        self.out = out if jax.process_index() == 0 else (lambda line: None)
        self.step, self.carried = 0, None
        self._closers: list[Callable[[], None]] = []
        try:
            self._open(state, history)
        except BaseException:
            self.__exit__()
            raise

    def _open(self, state: TrainState, history: tuple[dict | None, dict] | None) -> None:
        config, setup, run = self.config, self.setup, self.run
        primary = jax.process_index() == 0
        data_state = None
        self.ckpts = run.checkpoints(keep=config.keep_checkpoints, read_only=False)
        self._closers.append(self.ckpts.close)
        previous = None
        if history is not None:
            state, data_state = self._restore(state)
            previous, changes = history
            previous = dict(previous or run.read_config())
            if "data" in changes:  # the epochs left are planned on the new data
                state, data_state = self._replan(state, data_state, previous, changes)
                setup = self.setup
            entry = resume.history_entry(self.step, changes)
            previous["history"] = [*previous.get("history", []), entry]
        notes = []
        # A new run's config.json is written now; a resumed run's changed settings with its
        # first checkpoint, so that a resume that fails before it leaves config.json as it
        # was (with the checkpoint it describes) and the printed resume command still works.
        self._config_to_write = resolved_config(setup, previous) if primary else None
        try:
            if primary and history is None:
                self._write_config()
            if primary:  # once the resume is known to be valid
                finished = setup.plan.epoch_of(self.step)
                notes = metrics.resume_file(run.metrics_path, self.step, finished)
                if history is not None and "steps_per_epoch" in history[1]:
                    before, now = history[1]["steps_per_epoch"]
                    notes.append(
                        f"the data changed: epochs of {now} steps (were {before}); epoch "
                        f"{finished + 1} ends at step {setup.plan.epoch_end(finished)}, the "
                        f"last at step {setup.total_steps}"
                    )
            self.writer = metrics.MetricsWriter(run.path, enabled=primary, resume_step=self.step)
        except OSError as e:
            raise TrainingError(f"cannot write to {run.path}: {e.strerror or e}") from None
        self._closers.append(self.writer.close)
        for line in console.header(setup, self.step if history is not None else None):
            self.out(line)
        for line in notes:
            self.out(f"note: {line}")

        self.batches = iter(self._pipeline(config.augment, config.workers))
        self._closers.append(self.batches.close)
        if data_state is not None:
            if config.accept_new_data:  # the data's signature is the new data's
                data_state = {**self.batches.get_state(), "step": data_state["step"]}
            self.batches.set_state(data_state)
        # A frozen backbone keeps the source's BatchNorm statistics: nothing to recompute.
        recompute_bn = bool(jax.tree.leaves(state.batch_stats)) and self.trainable is None
        self.bn_pipeline = (
            self._pipeline("none", workers=0) if config.precise_bn and recompute_bn else None
        )
        self.par = parallel.make(config.parallel, config.label_smoothing, self.trainable)
        self.dstate = self.par.put_state(state)
        self.stop = StopRequest()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        for close in reversed(self._closers):
            close()

    def _replan(
        self, state: TrainState, data_state: dict, previous: dict, changes: dict
    ) -> tuple[TrainState, dict]:
        """Continue on changed data (--accept-new-data) from the step reached: the epochs
        finished stay finished, the rest are planned at the new data's epoch length (which
        changes the schedule's length to match); the data continue at the same place in
        the new data's stream. Returns the state and data position to continue from."""
        setup = self.setup
        old = resolve.EpochPlan.stored(previous, setup.steps_per_epoch)
        plan = old.replanned(self.step, setup.steps_per_epoch)
        if plan.steps_per_epoch != old.steps_per_epoch:
            changes["steps_per_epoch"] = [old.steps_per_epoch, plan.steps_per_epoch]
        self.setup = setup = setup.with_plan(plan)
        tx, self.schedule = build_optimizer(setup, self.trainable)
        return state.replace(tx=tx), {**data_state, "step": plan.data_index(self.step)}

    def _pipeline(self, augment: str, workers: int) -> data.TrainPipeline:
        net = self.setup.network
        return data.TrainPipeline(
            self.setup.dataset,
            global_batch_size=self.setup.batch_size,
            image_size=net.image_size,
            channels=net.in_channels,
            seed=self.config.seed,
            augment=augment,
            worker_count=workers,
        )

    def _restore(self, state: TrainState) -> tuple[TrainState, dict]:
        """The newest intact checkpoint (damaged newer ones set aside, and said so)."""
        meta = self.setup.meta()

        def check_meta(saved: dict) -> None:
            for key in RESUME_KEYS:
                stored = saved.get(key, {} if key == "model_options" else None)
                if not resume.same(stored, meta[key]):
                    raise UsageError(
                        f"the checkpoint in {self.ckpts.directory} has {key}={saved.get(key)}, "
                        f"this run {meta[key]}; choose another --workdir"
                    )

        host = jax.tree.map(np.asarray, serialization.to_state_dict(state))
        try:
            restored, data_state, saved = self.ckpts.restore_intact(host, check_meta, self.out)
        except NoIntactCheckpoint as e:
            raise TrainingError(str(e)) from None
        state = serialization.from_state_dict(state, restored)
        self.step = int(state.step)
        self.carried = saved.get("epoch_sums")
        return state, data_state

    # -- the algorithm --------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        """Train to the last step; the final test metrics."""
        setup = self.setup
        test: dict[str, float] = {}
        if self.step >= setup.total_steps:  # resumed a finished run: report it again
            test = self.evaluate()["test"]
            self._write_config()
        with self.stop.installed():
            while self.step < setup.total_steps:
                epoch = setup.plan.epoch_of(self.step)
                record = self.train_epoch(epoch)
                test = self.end_epoch(record) or test
        best = self.ckpts.best_step()
        recorded = (self.ckpts.metrics(best) or {}) if best is not None else {}
        if VAL_METRIC in recorded:
            self.out(
                f"best checkpoint: step {best}, validation accuracy "
                f"{recorded[VAL_METRIC]:.4f} (what evaluate, predict and --init-from use)"
            )
        self.out(f"test accuracy: {test['accuracy']:.4f}")
        return test

    def train_epoch(self, epoch: int) -> dict:
        """Step to the end of `epoch`; its training record. A stop agreed mid-epoch saves
        the step reached (with the epoch's running sums) and raises `Interrupted`."""
        setup, config, par = self.setup, self.config, self.par
        end = setup.plan.epoch_end(epoch)
        first, start = self.step, time.perf_counter()
        sums = EpochSums(par.get_metrics, self.carried)
        self.carried = None
        done = self.step - (end - setup.steps_per_epoch)
        with console.progress_bar(setup, epoch, done, config.progress) as bar:
            while self.step < end:
                batch = par.put_batch(next(self.batches))
                self.dstate, metrics = par.train_step(self.dstate, batch)
                sums.add(metrics)
                self.step += 1
                bar.update()
                log_point = self.step % config.log_every == 0 or self.step == end
                if log_point:
                    host = self.finite(sums)
                    images = (self.step - first) * setup.batch_size
                    bar.set_postfix(
                        loss=f"{host['loss'] / host['count']:.4f}",
                        acc=f"{host['correct'] / host['count']:.4f}",
                        img_s=f"{images / (time.perf_counter() - start):.0f}",
                    )
                if self.stop.due(sync_point=log_point):
                    if self.step < end:
                        self.save(epoch_sums=self.finite(sums))
                        raise self.interrupted()
                    break
                if setup.checkpoint_due(self.step) and self.step < end:
                    self.save(epoch_sums=self.finite(sums))
        elapsed = time.perf_counter() - start
        return {
            "split": "train",
            "epoch": epoch + 1,
            "step": self.step,
            **means(self.finite(sums)),
            "lr": float(self.schedule(self.step - 1)),
            "images_per_sec": (self.step - first) * setup.batch_size / elapsed,
        }

    def end_epoch(self, record: dict) -> dict[str, float] | None:
        """Log the epoch, evaluate when due, checkpoint when due; the test metrics if any."""
        setup, epoch = self.setup, record["epoch"]
        self.log(record)
        last = self.step == setup.total_steps
        results, metrics = {}, None
        if epoch % self.config.eval_every == 0 or last:
            results = self.evaluate()
            for split, values in results.items():
                self.log({"split": split, "epoch": epoch, "step": self.step, **values})
            metrics = checkpoint_metrics(setup.best_by, results)
        test = results.get("test")
        self.out(console.epoch_line(setup, record, test, results.get("val")))
        stopping = self.stop.due(sync_point=True)
        if setup.checkpoint_due(self.step) or last or stopping:
            self.save(metrics=metrics)
        if stopping and not last:
            raise self.interrupted()
        return test

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Loss and accuracy on the validation split (where the run has one) and the test
        split, after recomputing BatchNorm statistics (precise BN): {"val": ..., "test": ...}.
        """
        if self.bn_pipeline is not None:
            self.dstate = precise_bn.recompute(self.par, self.dstate, self.bn_batches())
        net = self.setup.network
        splits = (["val"] if self.setup.dataset.val is not None else []) + ["test"]
        results = {}
        for split in splits:
            total = EpochSums(self.par.get_metrics)
            for batch in data.eval_batches(
                self.setup.dataset,
                split=split,
                global_batch_size=self.setup.batch_size,
                image_size=net.image_size,
                channels=net.in_channels,
            ):
                total.add(self.par.eval_step(self.dstate, self.par.put_batch(batch)))
            results[split] = means(total.host())
        return results

    def bn_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """The same first `precise_bn` training batches every time (no augmentation)."""
        count = min(self.config.precise_bn, self.setup.steps_per_epoch)
        batches = iter(self.bn_pipeline)
        try:
            for _ in range(count):
                yield next(batches)
        finally:
            batches.close()

    # -- bookkeeping ----------------------------------------------------------------------

    def finite(self, sums: EpochSums) -> dict[str, float]:
        """The sums on the host; NonFiniteLoss if a step's loss was NaN or infinite."""
        host = sums.host()
        bad = host.get(steps.FIRST_NONFINITE, steps.ALL_FINITE)
        if bad < steps.ALL_FINITE:
            raise NonFiniteLoss(int(bad), self.ckpts.directory, self.ckpts.latest_step())
        return host

    def _write_config(self) -> None:
        """config.json, if this process has one still to write."""
        if self._config_to_write is None:
            return
        try:
            self.run.write_config(self._config_to_write)
        except OSError as e:
            raise TrainingError(f"cannot write to {self.run.path}: {e.strerror or e}") from None
        self._config_to_write = None

    def save(self, metrics: dict | None = None, epoch_sums: dict | None = None) -> None:
        self._write_config()
        state = self.par.get_state(self.dstate)
        host = jax.tree.map(np.asarray, serialization.to_state_dict(state))
        meta = {**self.setup.meta(), "epoch_sums": epoch_sums}
        try:
            self.ckpts.save(self.step, host, self.batches.get_state(), meta, metrics)
        except CheckpointWriteError as e:
            raise TrainingError(
                f"cannot write the checkpoint at step {self.step} in {self.ckpts.directory} "
                f"({e.strerror}); the ones before it are intact: free space, then resume"
            ) from None

    def log(self, record: dict) -> None:
        try:
            self.writer.write(record)
        except OSError as e:
            raise TrainingError(
                f"cannot write {self.run.metrics_path} ({e.strerror}); the checkpoints are "
                "intact: free space, then resume"
            ) from None

    def interrupted(self) -> Interrupted:
        return Interrupted(self.stop.agreed, self.step, self.setup.workdir)
