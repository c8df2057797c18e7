"""Several processes (hosts) training one model: `jax.distributed` set-up.

Every process runs the same command with its own `--process-id`; each reads its own
shard of the data and `pmap`/`shard_map` span the devices of all processes. The three
flags go together; without them, the environment variables JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID serve, and on clusters that JAX detects itself
(Slurm, Open MPI, TPU pods) JAX_COORDINATOR_ADDRESS alone is enough.

Between CPU processes (tests, laptops) the collectives go through gloo. Process 0 alone
writes `config.json`, `metrics.jsonl`, TensorBoard events and the console output; every
process takes part in saving and restoring checkpoints, as orbax requires. A signal to
any process stops all of them after the same step (`any_signal`).
"""

from __future__ import annotations

import os
import sys
import threading

import jax
import numpy as np

from flaxcnn.cli import UsageError

ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


def settings(config) -> tuple[str | None, int | None, int | None]:
    """(address, process count, process index): the flags, else the environment."""
    address = config.coordinator_address or os.environ.get(ENV["coordinator_address"]) or None
    values = []
    for name in ("num_processes", "process_id"):
        value = getattr(config, name)
        text = os.environ.get(ENV[name], "")
        if value is None and text.strip():
            try:
                value = int(text)
            except ValueError:
                raise UsageError(f"{ENV[name]} must be an integer, got {text!r}") from None
        values.append(value)
    return address, values[0], values[1]


def initialize(config) -> None:
    """Join the other processes, before anything asks JAX for its devices.

    Bad settings raise UsageError (exit code 2) here, before any waiting for the others.
    """
    address, count, index = settings(config)
    if address is None or jax.distributed.is_initialized():
        return
    config.validate()  # every flag, not only these: fail before waiting for the others
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--coordinator-address must be HOST:PORT, got {address!r}")
    if count is not None and count < 1:
        raise UsageError(f"the number of processes must be positive, got {count}")
    if index is not None and (index < 0 or (count is not None and index >= count)):
        raise UsageError(f"process id {index} is not in range for {count} processes")
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        # Without a cross-process implementation, CPU computations cannot communicate.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = config.coordinator_timeout
    waited = min(NOTE_AFTER_S, timeout / 2)
    note = threading.Timer(waited, _say, [_waiting(address, count, index, timeout)])
    give_up = threading.Timer(timeout, _give_up, [_timed_out(address, count, index, timeout)])
    for timer in (note, give_up):
        timer.daemon = True
        timer.start()
    try:  # JAX's own deadline, later than ours, would abort with a C++ stack trace
        jax.distributed.initialize(
            address,
            num_processes=count,
            process_id=index,
            initialization_timeout=timeout + JAX_DEADLINE_MARGIN_S,
        )
    except ValueError as e:  # e.g. no process count given and no cluster detected
        raise UsageError(f"cannot start jax.distributed at {address}: {e}") from None
    finally:
        note.cancel()
        give_up.cancel()


NOTE_AFTER_S = 5.0  # joining takes well under a second when every process is there
JAX_DEADLINE_MARGIN_S = 60


def _waiting(address: str, count: int | None, index: int | None, timeout: int) -> str:
    who = "the other processes" if index == 0 else f"the coordinator (process 0) at {address}"
    return f"note: process {index} of {count} waiting for {who} (up to {timeout} s)"


def _timed_out(address: str, count: int | None, index: int | None, timeout: int) -> str:
    if index == 0:
        return (
            f"error: process 0 at {address} waited {timeout} s for the other processes: start "
            f"all {count} with the same --coordinator-address and --num-processes (or raise "
            "--coordinator-timeout)"
        )
    return (
        f"error: process {index} could not join the coordinator at {address} within "
        f"{timeout} s: check that process 0 runs there and that this host can reach that "
        "port (or raise --coordinator-timeout)"
    )


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _give_up(line: str) -> None:
    """From the timer's thread: the main thread is blocked inside JAX, so end the process
    here (exit code 1), before JAX's deadline aborts it with a stack trace."""
    _say(line)
    os._exit(1)


def any_signal(signum: int | None) -> int | None:
    """The signal that any process has received (the highest number), else None.

    A collective with several processes: every process must call it at the same point.
    """
    if jax.process_count() == 1:
        return signum
    from jax.experimental import multihost_utils

    received = multihost_utils.process_allgather(np.int32(signum or 0))
    return int(np.max(received)) or None
