"""Resuming a run: its own `config.json` is the source of truth.

`python -m flaxcnn.train --workdir W` alone continues W with every setting it was started
with. A setting given again must agree with the stored one, except those a run may change
on the way (`MAY_CHANGE`: a longer `--epochs`, logging, checkpointing cadence, workers,
progress, the parallel strategy, where the data live). A contradiction is refused with one
line naming the flag, the stored value and the given one; each accepted change is recorded
in the run's history (`config.json["history"]`) when the resumed run starts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection
from typing import Any

from flaxcnn.cli import UsageError
from flaxcnn.training.config import TrainConfig, flag

MAY_CHANGE = frozenset(
    {
        "epochs",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
        "workers",
        "progress",
        "parallel",
        "data_dir",
        "accept_new_data",
        "resume",
        "workdir",
        "coordinator_address",
        "num_processes",
        "process_id",
        "coordinator_timeout",
    }
)
# Settings that runs before this version did not record, with the value they ran with
# ("default": the data set's own augmentation, resolved from its name on resume).
LEGACY = {
    "precise_bn": 0, "skip_corrupt": False, "freeze_backbone": False, "augment": "default",
    "val_fraction": 0.0,
}  # fmt: skip
# What the stored run's data looked like: a changed folder shows in its fingerprint (any file
# added, removed, moved to another class, resized or touched), counts or statistics.
DATA_KEYS = (
    "name", "num_classes", "class_names", "num_train", "num_test", "mean", "std", "fingerprint",
    "num_val", "val_source",
)  # fmt: skip


def explicit_fields(config: TrainConfig) -> set[str]:
    """The settings of `config` that differ from TrainConfig's defaults: what a notebook
    user evidently chose (the CLI knows exactly which flags were given)."""
    default = TrainConfig()
    return {
        f.name
        for f in dataclasses.fields(TrainConfig)
        if getattr(config, f.name) != getattr(default, f.name)
    }


def reconcile(
    stored: dict[str, Any],
    config: TrainConfig,
    explicit: Collection[str],
    normalise=lambda name, value: value,
) -> tuple[TrainConfig, dict[str, list]]:
    """The stored run's settings with the allowed changes from `config` applied.

    `explicit` names the settings the user gave; `normalise(name, value)` puts a given value
    in the stored form (a folder path resolved, model options typed). Returns the config to
    resume with and the changes ({name: [stored, given]}); UsageError for a contradiction.
    """
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    merged = {k: v for k, v in stored.items() if k in fields}
    changes: dict[str, list] = {}
    workdir = stored.get("workdir")

    def contradiction(name: str, given: Any, before: Any) -> UsageError:
        option = fields[name].metadata.get("flag", flag(name))
        return UsageError(
            f"--{option} {given} contradicts the run in {workdir}, which has {before}; a "
            "resumed run keeps its settings: leave the flag out, or start a new --workdir"
        )

    for name in sorted(set(explicit) & set(fields)):
        given = normalise(name, getattr(config, name))
        before = merged.get(name)
        if name == "model_options":  # each option given must be the stored one (or default)
            stored_options = {**defaults_of(stored["arch"]), **(before or {})}
            for key, value in (given or {}).items():
                if not same(value, stored_options.get(key)):
                    raise contradiction(name, f"{key}={value}", f"{key}={stored_options.get(key)}")
            continue
        if name == "dropout" and before is None:  # the run used its model's own rate
            options = {**defaults_of(stored["arch"]), **(stored.get("model_options") or {})}
            before = options.get("dropout_rate")
        if same(given, before):
            continue
        if name not in MAY_CHANGE:
            raise contradiction(name, _show(given), _show(before))
        if name == "epochs" and isinstance(given, int) and 0 < given < before:
            raise UsageError(
                f"--epochs {given} is fewer than the run in {workdir} has ({before}); a "
                "resumed run can only be made longer"
            )
        merged[name] = given
        if name not in ("resume", "workdir", "accept_new_data"):
            changes[name] = [before, given]
    merged["resume"] = True
    return TrainConfig(**merged), changes


def defaults_of(arch: str) -> dict[str, Any]:
    from flaxcnn import models

    try:
        return models.options(arch)
    except ValueError:
        return {}


def history_entry(step: int, changes: dict[str, list]) -> dict[str, Any]:
    return {
        "resumed_at_step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "changes": changes,
    }


def data_signature(info: Any) -> dict[str, Any]:
    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in ((k, getattr(info, k)) for k in DATA_KEYS)
    }


def data_changes(stored: dict[str, Any] | None, info: Any) -> list[str]:
    """What differs between the stored data signature and the data now, e.g.
    ["num_test 36 -> 41"]; [] when they agree or nothing was stored."""
    if not stored:
        return []
    now = data_signature(info)
    changed = [k for k in DATA_KEYS if k in stored and not same(stored[k], now[k])]
    return [
        "its files (names, classes, sizes or times)"
        if k == "fingerprint"
        else f"{k} {_show(stored.get(k))} -> {_show(now[k])}"
        for k in changed
    ]


def same(a: Any, b: Any) -> bool:
    """Equal as settings: lists (from JSON) and tuples alike, ints and floats alike."""
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return a == b


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "(none)"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
