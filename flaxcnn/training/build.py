"""The one builder of "model + optimizer + state" for a configuration.

The trainer, `flaxcnn.bench`, `flaxcnn.evaluate` and the tests all build their networks
and train states here, so that what is benchmarked, evaluated and tested is what trains.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import optax

from flaxcnn import models
from flaxcnn.training import steps
from flaxcnn.training.state import TrainState, create_state


@dataclasses.dataclass(frozen=True)
class Network:
    """The network of a run: what a checkpoint must agree with to be restored."""

    arch: str
    num_classes: int
    image_size: int
    in_channels: int
    dtype: str = "float32"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def create(self, axis_name: str | None = None) -> nn.Module:
        """The Flax module; `axis_name` is the data axis BatchNorm averages over."""
        return models.create(
            self.arch,
            num_classes=self.num_classes,
            dtype=self.dtype,
            axis_name=axis_name,
            **self.options,
        )

    def input_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        return (batch, self.image_size, self.image_size, self.in_channels)

    def meta(self) -> dict[str, Any]:
        """As stored in checkpoint metadata (`model_options` for the options)."""
        return {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "dtype": self.dtype,
            "model_options": dict(self.options),
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Network:
        return cls(
            arch=meta["arch"],
            num_classes=meta["num_classes"],
            image_size=meta["image_size"],
            in_channels=meta["in_channels"],
            dtype=meta.get("dtype", "float32"),
            options=dict(meta.get("model_options") or {}),
        )


def create_train_state(network: Network, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Fresh parameters and optimizer state for `network`, stepping under the data axis.

    The variables are initialised without the data axis (there is no axis outside the
    parallel step); the state's `apply_fn` is the same network with it, for the steps.
    """
    state = create_state(network.create(None), tx, network.input_shape(), seed)
    return state.replace(apply_fn=network.create(steps.AXIS).apply)
