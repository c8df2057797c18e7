"""Checkpoints with orbax: the train state, the data iterator's position and run metadata.

A checkpoint is written to a temporary directory and renamed into place only when
complete (orbax's atomic commit), so a kill at any moment leaves the previous ones intact.
The last `keep` checkpoints are kept, plus the one with the best test accuracy.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

BEST_METRIC = "test_accuracy"


class Checkpoints:
    def __init__(self, directory: str | os.PathLike, keep: int = 3, read_only: bool = False):
        preservation = policies.AnyPreservationPolicy(
            [
                policies.LatestN(keep),
                policies.BestN(
                    get_metric_fn=lambda m: m[BEST_METRIC],
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation,
            # best_fn makes the manager record each save's metrics, which BestN and
            # best_step() read (also after a restart).
            best_fn=lambda m: m[BEST_METRIC],
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

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict,
        meta: dict,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Save host (numpy) `state`; every process calls this, orbax writes once."""
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

    def read_meta(self, step: int | None = None) -> dict:
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

    def close(self) -> None:
        self.manager.close()
