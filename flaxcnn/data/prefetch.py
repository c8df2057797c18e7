"""Reading ahead of the consumer: grain threads in this process, or grain worker processes."""

from __future__ import annotations

import os

import grain
from absl import flags

DEFAULT_THREADS = min(4, os.cpu_count() or 1)
# Batches buffered ahead of the consumer, per process (threads) or per worker (processes).
PREFETCH_BATCHES = 4


def read_ahead(
    batches: grain.MapDataset, worker_count: int, threads: int = DEFAULT_THREADS
) -> grain.IterDataset:
    """Read ahead in background threads; with ``worker_count`` > 0, in worker processes too."""
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=PREFETCH_BATCHES)
    iterable = batches.to_iter_dataset(read)
    if worker_count > 0:
        # grain 0.2 reads an absl flag when starting workers and fails if the program never
        # parsed flags (google/grain#1355); without absl.app, the defaults are what we want.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iterable = iterable.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=worker_count, per_worker_buffer_size=PREFETCH_BATCHES
            )
        )
    return iterable
