"""A run's directory: the one place that knows its layout and how to read it back.

    WORKDIR/config.json      every setting the run used, defaults resolved
    WORKDIR/metrics.jsonl    one JSON object per train/test record
    WORKDIR/tensorboard/     the same numbers as TensorBoard events
    WORKDIR/checkpoints/N/   orbax checkpoints at step N (state, data position, metadata),
                             with checksums.json: every file's size and SHA-256
    WORKDIR/.lock            held (flock) by the one process training here

The trainer writes it; `flaxcnn.evaluate`, `flaxcnn.plot` and warm starts (`--init-from`)
only read it. Quick questions (is there a checkpoint? which steps?) are answered from the
file system without importing orbax, so that bad input is refused at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flaxcnn.cli import UsageError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
DAMAGED = "checkpoints-damaged"  # damaged checkpoints are moved here, never deleted
LOCK = ".lock"
# What a checkpoint's metadata must hold to rebuild its model and read its data.
META_KEYS = ("arch", "num_classes", "class_names", "dataset", "image_size", "in_channels")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON through a temporary file renamed into place: never half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class RunDir:
    """The directory of one training run (which need not exist yet)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    config_path = property(lambda self: self.path / CONFIG)
    metrics_path = property(lambda self: self.path / METRICS)
    tensorboard_path = property(lambda self: self.path / TENSORBOARD)
    checkpoints_path = property(lambda self: self.path / CHECKPOINTS)

    @classmethod
    def existing(cls, path: str | os.PathLike, what: str = "workdir") -> RunDir:
        """A directory that must exist (UsageError otherwise), for the readers."""
        run = cls(path)
        if not run.path.exists():
            raise UsageError(f"{what} {run.path} does not exist")
        if not run.path.is_dir():
            raise UsageError(f"{what} {run.path} is not a directory")
        return run

    # -- reading ----------------------------------------------------------------------------

    def read_config(self) -> dict:
        """The run's `config.json`, or {} where it is missing or unreadable."""
        try:
            config = json.loads(self.config_path.read_text())
        except (OSError, ValueError):
            return {}
        return config if isinstance(config, dict) else {}

    def read_metrics(self) -> list[dict]:
        """The records of `metrics.jsonl`; UsageError when it is missing or unreadable."""
        from flaxcnn.training import metrics

        if not self.metrics_path.is_file():
            raise UsageError(f"{self.path} has no {METRICS} (is it a training workdir?)")
        try:
            return metrics.read(self.metrics_path)
        except UnicodeDecodeError as e:
            raise UsageError(f"cannot read {self.metrics_path}: {e.reason}") from None
        except ValueError as e:  # names the file and the line
            raise UsageError(str(e)) from None
        except OSError as e:
            raise UsageError(f"cannot read {self.metrics_path}: {e.strerror}") from None

    def checkpoint_steps(self) -> list[int]:
        """The steps of the committed checkpoints, from the file system alone (no orbax)."""
        return checkpoint_steps(self.checkpoints_path)

    def has_checkpoint(self) -> bool:
        return bool(self.checkpoint_steps())

    def require_checkpoint(self, step: int | None = None) -> None:
        """UsageError unless there is a checkpoint (at `step`, when given): a quick check."""
        steps = self.checkpoint_steps()
        if not steps:
            raise UsageError(f"{self.path} has no checkpoint (no {CHECKPOINTS}/<step> in it)")
        if step is not None and step not in steps:
            listed = ", ".join(map(str, steps))
            raise UsageError(f"no checkpoint at step {step}; the run has steps {listed}")

    def checkpoints(self, keep: int = 2, read_only: bool = True):
        """The orbax-backed `Checkpoints` of this run (read-only unless the trainer asks)."""
        from flaxcnn.training.checkpoint import Checkpoints

        return Checkpoints(self.checkpoints_path, keep=keep, read_only=read_only)

    def why_checkpoint(self, step: int, asked: bool = False) -> str:
        """Why the checkpoint at `step` is the one used: asked for (--step), or the one
        `restore_variables()` chose by default."""
        from flaxcnn.training.checkpoint import TEST_METRIC, VAL_METRIC

        if asked:
            return "the one asked for (--step)"
        with absl_errors_only():
            ckpts = self.checkpoints(read_only=True)
            try:
                best, metrics = ckpts.best_step(), ckpts.metrics(step) or {}
            finally:
                ckpts.close()
        if best is None and step == max(self.checkpoint_steps()):
            return "the latest: the run has no validation split to choose one by"
        if best != step:
            return "not the best; chosen with --step"
        if VAL_METRIC in metrics:
            return f"the best validation accuracy of the run ({metrics[VAL_METRIC]:.4f})"
        return (
            f"the best test accuracy of the run ({metrics[TEST_METRIC]:.4f}): it has no "
            "validation split, so the test split chose it"
        )

    def restore_variables(self, step: int | None = None) -> tuple[int, dict, dict]:
        """(step, metadata, {"params", "batch_stats"}) of the checkpoint at `step`, by default
        the best one (highest validation accuracy, or test accuracy for a run without a
        validation split), else the latest; UsageError if it is damaged."""
        from flaxcnn.training.checkpoint import damage

        self.require_checkpoint(step)
        with absl_errors_only():
            ckpts = self.checkpoints(read_only=True)
            try:
                if step is None:
                    step = ckpts.best_step()
                    step = ckpts.latest_step() if step is None else step
                if step is None:
                    raise UsageError(f"{self.path} has no complete checkpoint")
                problem = damage(self.checkpoints_path / str(step))
                if problem:
                    raise UsageError(
                        f"the checkpoint at step {step} in {self.path} is damaged ({problem}); "
                        "choose another --step"
                    )
                meta = ckpts.read_meta(step)
                missing = [k for k in META_KEYS if k not in meta]
                if missing:
                    raise UsageError(
                        f"the checkpoint at step {step} lacks {', '.join(missing)} in its metadata"
                    )
                state = ckpts.manager.restore(step)["state"]  # as saved: nested dicts
            finally:
                ckpts.close()
        variables = {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}
        return step, meta, variables

    # -- starting a run ---------------------------------------------------------------------

    def check_start(self, arch: str, resume: bool | None) -> bool:
        """Whether a run of `arch` here resumes; UsageError for anything that would damage
        the run already here. Reads only: nothing is created or written."""
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--workdir {self.path} exists and is not a directory")
        has_checkpoint = self.has_checkpoint()
        if has_checkpoint and resume is False:
            raise UsageError(
                f"{self.path} already holds checkpoints; choose another --workdir, or --resume"
            )
        if resume and not has_checkpoint:
            raise UsageError(f"--resume: {self.path} has no checkpoint to resume from")
        if not has_checkpoint and any((self.path / DAMAGED).glob("*")):
            raise UsageError(
                f"{self.path} holds only damaged checkpoints (in {DAMAGED}/): a fresh start "
                "would overwrite its history; choose another --workdir"
            )
        previous = self.read_config().get("arch")
        if self.config_path.exists() and not previous:
            raise UsageError(
                f"{self.config_path} is not a flaxcnn run's config.json; choose another --workdir"
            )
        if previous not in (None, arch):
            raise UsageError(
                f"{self.path} holds a {previous} run, not {arch}; choose another --workdir"
            )
        return has_checkpoint

    def create(self) -> None:
        """Make the directory and prove it writable (UsageError otherwise)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{socket.gethostname()}-{os.getpid()}"
            probe.write_text("")
            probe.unlink(missing_ok=True)
        except OSError as e:
            raise UsageError(f"cannot write to --workdir {self.path}: {e.strerror}") from None

    def write_config(self, config: dict) -> None:
        write_json_atomic(self.config_path, config)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run's exclusive lock; UsageError naming the holder when another has it.

        An advisory `flock` on WORKDIR/.lock: the operating system releases it when the
        process ends, however it ends (kill -9 included), so no stale lock survives. The
        holder writes its pid and command line into the file for the next one to name, if
        it can (unbuffered: on a full disk the lock holds all the same, and the first
        file the run must write says what is wrong).
        """
        path = self.path / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except IsADirectoryError:
            raise UsageError(
                f"{path} is a directory, where the run's lock file belongs: remove it"
            ) from None
        except OSError as e:
            raise UsageError(f"cannot open {path}: {e.strerror}") from None
        try:  # closing it releases the lock
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
                raise UsageError(
                    f"{self.path} is in use by {holder}; wait for it to finish, or choose "
                    "another --workdir"
                ) from None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"process {os.getpid()} ({_command_line()})\n".encode(), 0)
            yield
        finally:
            os.close(fd)


def checkpoint_steps(directory: Path) -> list[int]:
    """The step-numbered subdirectories of a checkpoint directory (none if it is missing)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


class absl_errors_only:
    """Silence absl's warnings for a while (orbax notes that a read-only manager is read-only).

    `absl_errors_only(silent=True)` silences its errors too: orbax logs a failed write from
    each of its threads with a traceback, and then raises, which the caller reports."""

    def __init__(self, silent: bool = False):
        self._silent = silent

    def __enter__(self):
        import logging

        self._logger = logging.getLogger("absl")
        self._level = self._logger.level
        self._logger.setLevel(logging.CRITICAL + 1 if self._silent else logging.ERROR)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)


def _command_line() -> str:
    try:
        with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:
            parts = f.read().split(b"\0")
        return " ".join(p.decode(errors="replace") for p in parts if p)[:300]
    except OSError:
        return "python"
