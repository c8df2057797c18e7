"""Checkpoints with orbax: the train state, the data iterator's position and run metadata.

A checkpoint is written to a temporary directory and renamed into place only when
complete (orbax's atomic commit), so a kill at any moment leaves the previous ones intact.
The last `keep` checkpoints are kept, plus the best: the one with the highest validation
accuracy, or test accuracy for a run without a validation split (`selection_metric`).

Damage after the fact (flipped bits, a truncated file, a full disk during a copy) is caught
by `checksums.json`, written into each checkpoint once it is committed: every file's size
and SHA-256. A resume verifies the newest checkpoint and falls back to the newest intact
one; a damaged checkpoint is moved aside to `checkpoints-damaged/` (never deleted), with a
line saying so. A checkpoint without checksums (written by an older version, or by a run
killed between the commit and the checksums) is used if orbax can read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from flaxcnn.training.rundir import DAMAGED, absl_errors_only

VAL_METRIC = "val_accuracy"
TEST_METRIC = "test_accuracy"
CHECKSUMS = "checksums.json"


def selection_metric(metrics: dict[str, float]) -> float:
    """What ranks a checkpoint: its validation accuracy where the run has a validation
    split, else its test accuracy (--val-fraction 0, and runs from before validation)."""
    return metrics[VAL_METRIC] if VAL_METRIC in metrics else metrics[TEST_METRIC]


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, directory unwritable)."""


IN_FLIGHT_S = 1.0  # how long writes still in flight after a failed one take to fail
# tensorstore's errors, which orbax passes on as ValueError, end with the errno, e.g.
# 'RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']'.
_OS_ERROR_CODE = re.compile(r"\[os_error_code='(\d+)'\]")


def os_error(error: Exception) -> OSError | None:
    """The operating system's error behind a failed write, if that is what it was."""
    if isinstance(error, OSError):
        return error
    match = _OS_ERROR_CODE.search(str(error))
    if match is None:
        return None
    code = int(match.group(1))
    return OSError(code, os.strerror(code))


class NoIntactCheckpoint(RuntimeError):
    """Every checkpoint of a run is damaged."""


class Checkpoints:
    def __init__(self, directory: str | os.PathLike, keep: int = 2, read_only: bool = False):
        preservation = policies.AnyPreservationPolicy(
            [
                policies.LatestN(keep),
                policies.BestN(
                    get_metric_fn=selection_metric,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation,
            # best_fn makes the manager record each save's metrics, which BestN and
            # best_step() read (also after a restart).
            best_fn=selection_metric,
            best_mode="max",
            enable_async_checkpointing=False,
            # A kill during a save leaves a temporary directory: removed on the next start.
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def metrics(self, step: int) -> dict[str, float] | None:
        """The metrics saved with the checkpoint at `step` (None: saved without any)."""
        return self.manager.metrics(step)

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict,
        meta: dict,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Save host (numpy) `state`; every process calls this, orbax writes once."""
        # orbax stops at the first failed write; tensorstore's writes still in flight then
        # fail too, each with a traceback on stderr (dozens for one full disk). Kept aside
        # and shown unless the failure is one the caller reports in a line.
        aside = io.StringIO()
        try:
            with absl_errors_only(silent=True), contextlib.redirect_stderr(aside):
                try:
                    self.manager.save(
                        step,
                        args=ocp.args.Composite(
                            state=ocp.args.StandardSave(state),
                            data=ocp.args.JsonSave(data_state),
                            meta=ocp.args.JsonSave(meta),
                        ),
                        metrics=metrics,
                        force=True,
                    )
                    self.manager.wait_until_finished()
                except Exception:
                    time.sleep(IN_FLIGHT_S)  # the other writes end, their output aside
                    raise
        except Exception as e:
            error = os_error(e)
            if error is None:
                sys.stderr.write(aside.getvalue())
                raise
            raise CheckpointWriteError(error.errno, error.strerror or str(error)) from e
        sys.stderr.write(aside.getvalue())
        if _is_primary():
            try:
                write_checksums(Path(self.directory) / str(step))
            except OSError as e:
                raise CheckpointWriteError(e.errno, e.strerror or str(e)) from e

    def read_meta(self, step: int | None = None) -> dict:
        """The run metadata saved with the checkpoint at `step` (default: the latest)."""
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """(state shaped like `template`, data iterator state, metadata) at `step`."""
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(template),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], restored["data"], restored["meta"]

    def restore_intact(
        self, template: Any, check_meta: Callable[[dict], None], report: Callable[[str], None]
    ) -> tuple[Any, dict, dict]:
        """Restore the newest intact checkpoint; damaged newer ones are set aside and named.

        `check_meta(meta)` runs on a checkpoint's metadata before its state is read: a
        checkpoint of another run raises there (and is left alone, not called damaged).
        Nothing is moved unless an older checkpoint restores: if none does, every one stays
        where it is and NoIntactCheckpoint lists what was wrong with each.
        """
        damaged: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            step_dir = Path(self.directory) / str(step)
            problem = damage(step_dir)
            if problem is None:
                check_meta(read_meta_file(self.directory, step))
                try:
                    restored = self.restore(template, step)
                except Exception as e:  # orbax's errors for unreadable files vary
                    problem = f"orbax cannot read it: {type(e).__name__}: {str(e)[:120]}"
                else:
                    for bad, why in damaged:
                        self._set_aside(bad, why, report)
                    return restored
            damaged.append((step, problem))
        listed = "; ".join(f"{step}: {why}" for step, why in damaged)
        raise NoIntactCheckpoint(f"no checkpoint in {self.directory} can be restored ({listed})")

    def _set_aside(self, step: int, problem: str, report: Callable[[str], None]) -> None:
        if not _is_primary():  # process 0 moves it; the others only skip it
            report(f"checkpoint {step} is damaged ({problem}); skipped")
            return
        try:
            moved = set_aside(Path(self.directory) / str(step))
        except OSError as e:
            report(f"checkpoint {step} is damaged ({problem}); could not move it: {e.strerror}")
            return
        self.manager.reload()
        report(f"checkpoint {step} is damaged ({problem}); moved to {moved}")

    def close(self) -> None:
        self.manager.close()


def _is_primary() -> bool:
    import jax

    return jax.process_index() == 0


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(step_dir: Path) -> None:
    """Record every file of a committed checkpoint: {relative path: [size, sha256]}."""
    sums = {
        p.relative_to(step_dir).as_posix(): [p.stat().st_size, _sha256(p)] for p in _files(step_dir)
    }
    tmp = step_dir / f".{CHECKSUMS}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(sums, indent=1, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / CHECKSUMS)


def damage(step_dir: Path) -> str | None:
    """What is wrong with a checkpoint according to its checksums, else None (also when it
    has none to check)."""
    path = step_dir / CHECKSUMS
    if not path.is_file():
        return None
    try:
        listed = json.loads(path.read_text()).items()
        expected = {k: (int(size), str(sha)) for k, (size, sha) in listed}
    except (OSError, ValueError, TypeError, AttributeError):
        return f"its {CHECKSUMS} is unreadable"
    if not step_dir.is_dir():
        return "it is gone"
    for relative, (size, sha) in sorted(expected.items()):
        file = step_dir / relative
        if not file.is_file():
            return f"{relative} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{relative} has {actual} bytes, {size} were written"
        if _sha256(file) != sha:
            return f"{relative} does not match its checksum"
    return None


def set_aside(step_dir: Path) -> Path:
    """Move a damaged checkpoint out of orbax's sight, keeping it for inspection."""
    target_root = step_dir.parent.parent / DAMAGED
    target_root.mkdir(exist_ok=True)
    target = target_root / f"{step_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.move(str(step_dir), str(target))
    return target


def read_meta_file(directory: str | os.PathLike, step: int) -> dict:
    """The metadata of checkpoint `step` read as the JSON file orbax wrote, without orbax
    (a fraction of a second instead of seconds), falling back to orbax for other layouts."""
    try:
        meta = json.loads((Path(directory) / str(step) / "meta" / "metadata").read_text())
        if isinstance(meta, dict):
            return meta
    except (OSError, ValueError):
        pass
    ckpts = Checkpoints(directory, read_only=True)
    try:
        return ckpts.read_meta(step)
    finally:
        ckpts.close()
