"""Training: the train state, the data-parallel steps, checkpoints, metrics and the loop.

    from flaxcnn.training import TrainConfig, train
    train(TrainConfig(arch="resnet20", dataset="digits", epochs=5))

`train` and `TrainingError` load the whole loop (jax, orbax, the data pipeline) on first
use, so that light submodules such as `flaxcnn.training.metrics` import quickly.
"""

from flaxcnn.training.config import TrainConfig

__all__ = ["TrainConfig", "TrainingError", "train"]


def __getattr__(name: str):
    if name in ("train", "TrainingError"):
        from flaxcnn.training import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'flaxcnn.training' has no attribute {name!r}")
