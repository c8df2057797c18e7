"""Data parallelism: the same step on every device, each with its slice of the global batch.

Two interchangeable strategies run the per-device functions of `steps.py`:

* `pmap` (default): the state is replicated with a leading device axis; each process
  feeds its local devices and `jax.pmap` spans every device of every process.
* `shard_map`: one global array per value over a 1-D device mesh; the state is replicated
  (`P()`), the batch split along the mesh axis (`P("batch")`), and the step is `jax.jit`
  of `jax.shard_map`.

Both give the same numbers and donate the old state's buffers to the new one (pmap
only on accelerators, see `PmapParallel`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxcnn.training import steps

STRATEGIES = ("pmap", "shard_map")


class DataParallel:
    """Places states and batches on the devices and runs the compiled steps."""

    name: str

    def __init__(self, label_smoothing: float = 0.0, trainable: Any = None):
        self.local_devices = jax.local_device_count()
        self.devices = jax.device_count()
        train = functools.partial(
            steps.train_step, label_smoothing=label_smoothing, trainable=trainable
        )
        self.train_step = self._compile(train, donate=True)
        self.eval_step = self._compile(steps.eval_step, donate=False)
        self.batch_norm_step = self._compile(steps.batch_norm_step, donate=False)

    def _compile(self, fn: Callable, donate: bool) -> Callable:
        raise NotImplementedError

    def put_state(self, state: Any) -> Any:
        """Host (or single-device) state -> one copy per device."""
        raise NotImplementedError

    def get_state(self, state: Any) -> Any:
        """One device's copy as host numpy arrays (every copy is identical)."""
        raise NotImplementedError

    def put_batch(self, batch: dict[str, np.ndarray]) -> Any:
        """This process's slice of the global batch -> the devices."""
        raise NotImplementedError

    def get_metrics(self, metrics: Any) -> dict[str, float]:
        """Summed metrics (identical on every device) as Python floats."""
        return {k: float(v) for k, v in self.get_state(metrics).items()}


class PmapParallel(DataParallel):
    name = "pmap"

    def _compile(self, fn, donate):
        # Donating pmap's state buffers makes a CPU step 2-6x slower (jax 0.10, resnet34
        # on 8x8 digits, batch 128, after warm-up: 0.7-1.8 s vs 0.26-0.29 s), so donate
        # only on accelerators, where it saves a copy of the state in device memory.
        donate = donate and jax.default_backend() != "cpu"
        return jax.pmap(fn, axis_name=steps.AXIS, donate_argnums=(0,) if donate else ())

    def put_state(self, state):
        # One host copy per local device, placed by an identity pmap so that the arrays
        # have exactly the sharding the step returns (else the second step recompiles).
        n = self.local_devices
        stacked = jax.tree.map(lambda x: np.stack([np.asarray(x)] * n), state)
        return jax.pmap(lambda x: x, axis_name=steps.AXIS)(stacked)

    def get_state(self, state):
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], state)

    def put_batch(self, batch):
        return {k: interleave(v, self.local_devices) for k, v in batch.items()}


class ShardMapParallel(DataParallel):
    name = "shard_map"

    def __init__(self, label_smoothing: float = 0.0, trainable: Any = None):
        self.mesh = Mesh(np.asarray(jax.devices()), (steps.AXIS,))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.sharded = NamedSharding(self.mesh, PartitionSpec(steps.AXIS))
        super().__init__(label_smoothing, trainable)

    def _compile(self, fn, donate):
        mapped = jax.shard_map(
            fn,
            mesh=self.mesh,
            in_specs=(PartitionSpec(), PartitionSpec(steps.AXIS)),
            out_specs=PartitionSpec(),
            check_vma=False,
        )
        return jax.jit(mapped, donate_argnums=(0,) if donate else ())

    def put_state(self, state):
        host = jax.tree.map(np.asarray, state)
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(self.replicated, x, x.shape), host
        )

    def get_state(self, state):
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state)

    def put_batch(self, batch):
        def place(x):
            global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
            x = interleave(x, jax.local_device_count()).reshape(x.shape)
            return jax.make_array_from_process_local_data(self.sharded, x, global_shape)

        return {k: place(v) for k, v in batch.items()}


def interleave(x: np.ndarray, n: int) -> np.ndarray:
    """`[n, len(x) // n, ...]`, part `d` being every n-th example from `d`.

    Each process takes every process_count-th example of a global batch (data/pipeline.py);
    splitting a process's batch over its devices the same way puts the same examples, in
    the same order, on device `d` of 1 process x N devices and of N processes x 1 device,
    so that the two give the same numbers, not only the same up to rounding.
    """
    if x.shape[0] % n:
        raise ValueError(f"a batch of {x.shape[0]} does not split over {n} devices")
    return x.reshape(-1, n, *x.shape[1:]).swapaxes(0, 1)


def make(name: str, label_smoothing: float = 0.0, trainable: Any = None) -> DataParallel:
    """The strategy `name`; `trainable` is the --freeze-backbone mask (see `steps.train_step`)."""
    if name == "pmap":
        return PmapParallel(label_smoothing, trainable)
    if name == "shard_map":
        return ShardMapParallel(label_smoothing, trainable)
    raise ValueError(f"unknown parallel strategy {name!r}; choose from {', '.join(STRATEGIES)}")
