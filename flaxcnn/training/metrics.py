"""Where a run's numbers go: `metrics.jsonl`, TensorBoard event files, and nowhere else;
and the running sums an epoch's training numbers come from.

Only process 0 writes. Each JSON line is flushed and fsynced as it is written; on resume
the lines past the restored step are dropped (with an atomic rewrite) so that a resumed
run's file is exactly what an uninterrupted run would have written.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TIMING_FIELDS = ("images_per_sec", "time")


class MetricsWriter:
    def __init__(self, workdir: str | os.PathLike, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        with _without_torch():  # imported here: process 0 only
            from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(
            str(Path(workdir) / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
        )

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        split, step = record["split"], record["step"]
        for key, value in record.items():
            if key not in ("split", "epoch", "step") and isinstance(value, int | float):
                self._tb.add_scalar(f"{split}/{key}", value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


@contextlib.contextmanager
def _without_torch() -> Iterator[None]:
    """Hide PyTorch from an import that only tries it: tensorboardX imports torch, when
    installed, to accept its tensors, which costs a run seconds of start-up (2.7 s here)
    for nothing (scalars are Python floats). A torch imported already stays as it is."""
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None  # `import torch` raises ImportError
    try:
        yield
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


def read(path: str | os.PathLike) -> list[dict]:
    """The records of a `metrics.jsonl` (or of the one in a workdir).

    A half-written last line (a kill or a full disk mid-write) is left out; any other line
    that is not a JSON object raises ValueError naming its line number.
    """
    return _parse(path)[0]


def _parse(
    path: str | os.PathLike, strict: bool = True
) -> tuple[list[dict], list[int], int | None]:
    """(records, numbers of the other lines left out, the number of a torn last line or None).

    A torn last line is always left out; any other line that is not a JSON object only when
    not `strict` (else ValueError)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    text = path.read_text()
    lines = text.split("\n")
    records, dropped, torn = [], [], None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if number == len(lines) and not text.endswith("\n"):  # cut off mid-write
                torn = number
                continue
            if strict:
                raise ValueError(f"{path} line {number} is not a JSON object: {line[:60]!r}")
            dropped.append(number)
            continue
        records.append(record)
    return records, dropped, torn


def resume_file(path: Path, step: int, finished: int) -> list[str]:
    """Make `metrics.jsonl` what an uninterrupted run would have at `step`; say what was lost.

    Records logged after `step` are dropped (they are about to be logged again), so is a
    torn last line; a missing file, or one without the train records of the `finished`
    epochs, is reported (those records cannot be recovered), not fatal.
    """
    notes: list[str] = []
    if not path.exists():
        if finished:  # before the end of the first epoch, nothing had been written yet
            span = "1" if finished == 1 else f"1-{finished}"
            notes.append(f"{path} is missing: the records of epoch(s) {span} are lost")
        return notes
    records, dropped, torn = _parse(path, strict=False)
    if torn is not None:
        notes.append(f"{path}: dropped a half-written last line (line {torn})")
    if dropped:
        listed = ", ".join(map(str, dropped))
        notes.append(f"{path}: dropped line(s) {listed}, which are not JSON objects")
    kept = [r for r in records if r.get("step", 0) <= step] if step else []
    logged = {r.get("epoch") for r in kept if r.get("split") == "train"}
    lost = [e for e in range(1, finished + 1) if e not in logged]
    if lost:
        span = f"{lost[0]}" if len(lost) == 1 else f"{lost[0]}-{lost[-1]}"
        notes.append(
            f"{path} has no records of epoch(s) {span} (the file was shortened): they are lost"
        )
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return notes


class EpochSums:
    """The running sums (loss x examples, correct, examples) of an epoch's train steps.

    The sums stay on the devices and add up in float32 as the steps return them; `host()`
    fetches them (a sync) at log points. A run resumed mid-epoch starts from the sums saved
    with the checkpoint, so the epoch's numbers are bit-identical to an uninterrupted run's.
    The non-finite marker (the first step whose loss was NaN/inf) is a running minimum.
    """

    def __init__(self, get_metrics, carried: dict[str, float] | None = None):
        self._get_metrics = get_metrics
        self._carried = carried
        self._device: Any = None

    def add(self, metrics: Any) -> None:
        import jax
        import jax.numpy as jnp
        import numpy as np

        from flaxcnn.training.steps import FIRST_NONFINITE

        if self._device is None:
            if self._carried:
                carried = self._carried
                self._device = jax.tree.map(
                    lambda m, c: jnp.full_like(m, np.float32(c)), metrics, carried
                )
            else:
                self._device = metrics
                return
        self._device = {
            k: (jnp.minimum if k == FIRST_NONFINITE else jnp.add)(self._device[k], v)
            for k, v in metrics.items()
        }

    def host(self) -> dict[str, float]:
        """The sums as Python floats (those carried over when no step has run yet)."""
        if self._device is None:
            return dict(self._carried or {})
        return self._get_metrics(self._device)
