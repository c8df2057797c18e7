"""Training: the train state, the data-parallel steps, checkpoints, metrics and the loop.

from flaxcnn.training import TrainConfig, train
train(TrainConfig(arch="resnet20", dataset="digits", epochs=5))
"""

from flaxcnn.training.config import TrainConfig
from flaxcnn.training.loop import TrainingError, train

__all__ = ["TrainConfig", "TrainingError", "train"]
