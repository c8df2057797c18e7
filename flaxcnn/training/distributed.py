"""Several processes (hosts) training one model: `jax.distributed` set-up.

Every process runs the same command with its own `--process-id`; each reads its own
shard of the data and `pmap`/`shard_map` span the devices of all processes. The flags
fall back to the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID, and on clusters JAX detects itself (Slurm, Open MPI, TPU pods) no flag
is needed beyond the coordinator's address.
"""

from __future__ import annotations

import os

import jax

from flaxcnn.cli import UsageError


def settings(config) -> tuple[str | None, int | None, int | None]:
    address = config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    count = config.num_processes
    index = config.process_id
    if count is None and "JAX_NUM_PROCESSES" in os.environ:
        count = int(os.environ["JAX_NUM_PROCESSES"])
    if index is None and "JAX_PROCESS_ID" in os.environ:
        index = int(os.environ["JAX_PROCESS_ID"])
    return address, count, index


def initialize(config) -> None:
    """Join the other processes, before anything asks JAX for its devices."""
    address, count, index = settings(config)
    if address is None or jax.distributed.is_initialized():
        return
    if ":" not in address:
        raise UsageError(f"--coordinator-address must be HOST:PORT, got {address!r}")
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        # Collectives between CPU processes (tests, laptops) go through gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, num_processes=count, process_id=index)
