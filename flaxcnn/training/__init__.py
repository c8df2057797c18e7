"""Training: the train state, the data-parallel steps, checkpoints, metrics and the loop.

    from flaxcnn.training import TrainConfig, train
    train(TrainConfig(arch="resnet20", dataset="digits", epochs=5))

`train` raises `UsageError` (bad input; nothing written), `NonFiniteLoss` (a
`TrainingError`) and `Interrupted` (a signal; the step reached is saved). It loads the
whole loop (jax, orbax, the data pipeline) on first use, so that light submodules such as
`flaxcnn.training.metrics` import quickly.

    config.py      every setting, with its default and --help text (TrainConfig)
    resolve.py     config + data -> every number a run needs (Setup), validated
    build.py       the network, and the train state for it (one builder for all tools)
    optim.py       optimizers and learning-rate schedules
    state.py       the train state (params, BatchNorm statistics, optimizer, rng)
    steps.py       the per-device train, eval and BatchNorm-statistics steps
    parallel.py    pmap / shard_map wrappers that place data and run the steps
    evaluation.py  the predict function and the metrics computed from it
    precise_bn.py  BatchNorm statistics recomputed before evaluation
    loop.py        train(): the loop, as the algorithm reads
    console.py     what a run prints (header, epoch lines, progress bar)
    signals.py     stopping on SIGINT/SIGTERM at the same step on every process
    warm_start.py  --init-from: weights from another run
    resume.py      resuming from config.json: contradictions, allowed changes, history
    memory.py      the memory a configuration needs, checked before it is built
    rundir.py      a run directory's layout, its readers and its lock
    checkpoint.py  orbax checkpoints (state, data position, metadata) with checksums
    metrics.py     metrics.jsonl and TensorBoard; running sums of an epoch
    distributed.py several processes/hosts (jax.distributed)
    errors.py      the exceptions train() raises
"""

from flaxcnn.training.config import TrainConfig
from flaxcnn.training.errors import Interrupted, NonFiniteLoss, TrainingError, UsageError

__all__ = [
    "Interrupted",
    "NonFiniteLoss",
    "TrainConfig",
    "TrainingError",
    "UsageError",
    "train",
]


def __getattr__(name: str):
    if name == "train":
        from flaxcnn.training import loop

        return loop.train
    raise AttributeError(f"module 'flaxcnn.training' has no attribute {name!r}")
