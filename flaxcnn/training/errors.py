"""What `train()` raises, so that a notebook can catch it and a CLI can turn it into an exit code.

* `UsageError` (a `ValueError`): bad configuration or input; nothing was written.
* `NonFiniteLoss` (a `TrainingError`): the loss became NaN/inf; the checkpoints before it
  are kept.
* `Interrupted`: SIGINT/SIGTERM arrived; the step reached was checkpointed first.

`python -m flaxcnn.train` alone maps them to messages and exit codes 2, 1 and 128+signal.
"""

from __future__ import annotations

import shlex
import signal
from pathlib import Path

from flaxcnn.cli import UsageError

__all__ = ["Interrupted", "NonFiniteLoss", "TrainingError", "UsageError"]


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says what to do."""


class NonFiniteLoss(TrainingError):
    """The loss became non-finite at `step`; the last good checkpoint, if one was saved
    (`last_saved`), is in `checkpoints`."""

    def __init__(self, step: int, checkpoints: str | Path, last_saved: int | None = None):
        self.step = step
        self.checkpoints = Path(checkpoints)
        if last_saved is None:
            advice = (
                "no checkpoint had been saved: start again in a new --workdir with a lower "
                "--lr, or check the data"
            )
        else:
            advice = (
                f"the last good checkpoint (step {last_saved}) is kept in {checkpoints}: "
                "lower --lr or check the data"
            )
        super().__init__(f"the loss became non-finite at step {step}; {advice}")


class Interrupted(Exception):
    """Training stopped on a signal after checkpointing `step`; `resume_command` continues it."""

    def __init__(self, signum: int, step: int, workdir: str | Path):
        self.signum = signum
        self.step = step
        self.workdir = Path(workdir)
        # The run's config.json holds every setting: the workdir is all a resume needs.
        self.resume_command = shlex.join(
            ["python", "-m", "flaxcnn.train", "--workdir", str(workdir)]
        )
        super().__init__(
            f"{signal.Signals(signum).name} at step {step}: checkpoint saved. "
            f"Resume with: {self.resume_command}"
        )

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal's number (130 for Ctrl-C)."""
        return 128 + self.signum
