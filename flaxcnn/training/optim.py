"""Optimizers and learning-rate schedules.

The learning rate given by the user is the rate for a global batch of 256 and is scaled
linearly with the actual global batch (Goyal et al., 2017), so that changing the batch
size or the number of devices does not call for a new learning rate. Linear scaling was
measured for large batches; below a batch of 64 the rate stays at 64's (LR_MIN_BATCH).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-3}  # per 256 images
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 0.05}
REFERENCE_BATCH = 256
# Smaller batches take the rate of this one. Scaled all the way down, the batch of 8 that a
# folder of 180 images gets had a step 8x smaller than the digits' batch of 64 (16x smaller
# than a batch of 128's), and such folders did not learn in 10 epochs (docs/small-data.md).
LR_MIN_BATCH = 64


def scaled_lr(base_lr: float, global_batch_size: int, min_batch: int = LR_MIN_BATCH) -> float:
    """`base_lr` (per 256 images) for a global batch: linear in the batch, but not below
    the rate of `min_batch` (1: linear all the way down, as runs before the floor had)."""
    return base_lr * max(global_batch_size, min_batch) / REFERENCE_BATCH


def make_schedule(name: str, peak_lr: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then cosine to 0 / x0.1 steps at 50% and 75% / constant."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    rest = max(total_steps - warmup_steps, 1)
    if name == "cosine":
        after = optax.cosine_decay_schedule(peak_lr, rest)
    elif name == "step":
        after = optax.piecewise_constant_schedule(
            peak_lr, {int(rest * 0.5): 0.1, int(rest * 0.75): 0.1}
        )
    else:
        after = optax.constant_schedule(peak_lr)
    if warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, peak_lr, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


def decay_mask(params) -> object:
    """Weight decay on convolution and dense kernels only: never on biases or BatchNorm."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(
    name: str,
    schedule: optax.Schedule,
    weight_decay: float,
    momentum: float = 0.9,
) -> optax.GradientTransformation:
    """SGD with Nesterov momentum (and L2 decay), or AdamW (decoupled decay)."""
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(weight_decay, mask=decay_mask),
            optax.sgd(schedule, momentum=momentum, nesterov=True),
        )
    if name == "adamw":
        return optax.adamw(schedule, weight_decay=weight_decay, mask=decay_mask)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """Everything that defines a run's optimizer and schedule, resolved to numbers."""

    name: str
    peak_lr: float  # already scaled to the global batch
    schedule: str
    total_steps: int
    warmup_steps: int
    weight_decay: float
    lr_min_batch: int = LR_MIN_BATCH  # the batch below which the rate no longer shrinks

    @classmethod
    def from_config(
        cls,
        config: Any,
        *,
        batch_size: int,
        total_steps: int,
        warmup_steps: int,
        lr_min_batch: int = LR_MIN_BATCH,
    ) -> OptimizerSettings:
        """A `TrainConfig`'s optimizer with its defaults filled in: the learning rate (per
        256 images, scaled to `batch_size`) and the weight decay of the optimizer."""
        name = config.optimizer
        base = DEFAULT_LR[name] if config.lr is None else config.lr
        decay = config.weight_decay
        return cls(
            name=name,
            peak_lr=scaled_lr(base, batch_size, lr_min_batch),
            schedule=config.schedule,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            weight_decay=DEFAULT_WEIGHT_DECAY[name] if decay is None else decay,
            lr_min_batch=lr_min_batch,
        )

    def build(self) -> tuple[optax.GradientTransformation, optax.Schedule]:
        schedule = make_schedule(self.schedule, self.peak_lr, self.total_steps, self.warmup_steps)
        return make_optimizer(self.name, schedule, self.weight_decay), schedule
