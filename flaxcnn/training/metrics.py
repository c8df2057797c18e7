"""Where a run's numbers go: `metrics.jsonl`, TensorBoard event files, and nowhere else.

Only process 0 writes. Each JSON line is flushed and fsynced as it is written; on resume
the lines past the restored step are dropped (with an atomic rewrite) so that a resumed
run's file is exactly what an uninterrupted run would have written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TIMING_FIELDS = ("images_per_sec", "time")


class MetricsWriter:
    def __init__(self, workdir: str | os.PathLike, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        truncate_after(self.path, resume_step)
        from tensorboardX import SummaryWriter  # imported here: process 0 only

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


def read(path: str | os.PathLike) -> list[dict]:
    """The records of a `metrics.jsonl` (or of the one in a workdir)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_after(path: Path, step: int) -> None:
    """Drop the records logged after `step` (they are about to be logged again)."""
    if not path.exists():
        return
    kept = [r for r in read(path) if r["step"] <= step] if step else []
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
