"""`--init-from`: start a run from another run's weights (fine-tuning, longer schedules).

`locate` and `check_options` answer quickly, before anything is built: the source must
hold a checkpoint of the same architecture with the same model options, except those that
only change training or initialisation (dropout rates, auxiliary heads, the small-input stem,
zero-initialised residuals). `read` restores its variables and `fresh_names` tells, still
before anything is written, which of the new network's variables it cannot provide; `load`
then copies every parameter and BatchNorm statistic whose name and shape match; the others
(the classifier, when the class count differs; a stem of another size) keep their fresh
initialisation and are named. The source may be a training run or converted torchvision
weights (`flaxcnn.convert`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

from flaxcnn import models
from flaxcnn.cli import UsageError
from flaxcnn.training.build import Network
from flaxcnn.training.checkpoint import Checkpoints, damage, read_meta_file
from flaxcnn.training.rundir import CHECKPOINTS, checkpoint_steps
from flaxcnn.training.state import TrainState

# Options a warm start may change: they do not change what the copied weights mean.
FREE_OPTIONS = frozenset(
    {"dropout_rate", "aux_dropout_rate", "aux_logits", "small_stem", "zero_init_residual"}
)


def locate(path: str, arch: str | None) -> tuple[Path, dict]:
    """(the checkpoint directory of `path`, a workdir or its checkpoints/; the metadata of its
    latest checkpoint). UsageError when it has none, or one of another architecture. Reads
    only the file system: answered before anything is built."""
    source = Path(path)
    directory = source / CHECKPOINTS if (source / CHECKPOINTS).is_dir() else source
    if not directory.is_dir():
        raise UsageError(f"--init-from {path}: no such directory")
    steps = checkpoint_steps(directory)
    if not steps:
        raise UsageError(f"--init-from {path}: no checkpoint found there")
    meta = read_meta_file(directory, steps[-1])
    if arch is not None and meta.get("arch") != arch:
        raise UsageError(f"--init-from {path} holds a {meta.get('arch')} checkpoint, not {arch}")
    return directory, meta


def check_options(path: str, meta: dict, network: Network) -> None:
    """UsageError when the source was trained with other model options than `network` has,
    except those that do not change what the copied weights mean (FREE_OPTIONS)."""
    defaults = models.options(network.arch)
    stored = meta.get("model_options") or {}
    for key in sorted((set(stored) | set(network.options)) - FREE_OPTIONS):
        before = stored.get(key, defaults.get(key))
        now = network.options.get(key, defaults.get(key))
        if _normalise(before) != _normalise(now):
            raise UsageError(
                f"--init-from {path} was trained with {key}={before}, this run has {key}={now}: "
                f"give --model-option {key}={before} to start from it"
            )


def _normalise(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def read(directory: Path) -> dict[str, Any]:
    """{"params", "batch_stats"} of the best (else latest) checkpoint in `directory`, as saved
    (host arrays, nested dicts); UsageError when it is damaged."""
    ckpts = Checkpoints(directory, read_only=True)
    try:
        step = ckpts.best_step()
        step = ckpts.latest_step() if step is None else step
        problem = damage(directory / str(step))
        if problem:
            raise UsageError(f"--init-from: the checkpoint at step {step} is damaged ({problem})")
        restored = ckpts.manager.restore(step)["state"]  # structure as saved, no template
    finally:
        ckpts.close()
    return {"params": restored.get("params", {}), "batch_stats": restored.get("batch_stats", {})}


def fresh_names(source: dict[str, Any], shapes: dict[str, Any]) -> list[str]:
    """The parameters and statistics of the new network (its variable `shapes`, as
    `Setup.shapes` holds them) that `source` cannot provide (missing, or of another shape),
    as `load` will name them; from shapes alone, nothing is computed."""
    fresh = {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}
    return _merge_all(fresh, source)[1]


def load(source: dict[str, Any], state: TrainState) -> tuple[TrainState, list[str]]:
    """`state` with the params and BatchNorm statistics of `source` (from `read`) where names
    and shapes match; returns it and the names left fresh."""
    fresh = {
        "params": serialization.to_state_dict(state.params),
        "batch_stats": serialization.to_state_dict(state.batch_stats),
    }
    merged, replaced = _merge_all(fresh, source)
    params = serialization.from_state_dict(state.params, merged["params"])
    state = state.replace(
        params=params,
        batch_stats=serialization.from_state_dict(state.batch_stats, merged["batch_stats"]),
        opt_state=state.tx.init(params),
    )
    return state, replaced


def _merge_all(fresh: dict[str, Any], source: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Each collection of `fresh` with `source`'s leaves where path and shape agree."""
    replaced: list[str] = []

    def merge(fresh_tree, loaded_tree):
        loaded = {
            jax.tree_util.keystr(p): v
            for p, v in jax.tree_util.tree_flatten_with_path(loaded_tree)[0]
        }

        def take(path, fresh):
            value = loaded.get(jax.tree_util.keystr(path))
            if value is not None and np.shape(value) == fresh.shape:
                return np.asarray(value, dtype=fresh.dtype)
            replaced.append(jax.tree_util.keystr(path))
            return fresh if isinstance(fresh, jax.ShapeDtypeStruct) else np.asarray(fresh)

        return jax.tree_util.tree_map_with_path(take, fresh_tree)

    merged = {col: merge(tree, source.get(col, {})) for col, tree in fresh.items()}
    return merged, replaced
