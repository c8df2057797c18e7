"""Stopping on SIGINT/SIGTERM after a whole step, at the same step on every process."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

from flaxcnn.training import distributed


class StopRequest:
    """SIGTERM/SIGINT: finish the current step, then let the loop save and stop.

    Several processes must stop after the same step (one that stops alone leaves the
    others waiting in a collective for ever), so `due` is their agreement, taken where
    the loop waits for the devices anyway; a signal to any process stops them all.
    A second Ctrl-C stops at once (KeyboardInterrupt).
    """

    def __init__(self):
        self.signal: int | None = None
        self.agreed: int | None = None  # the signal that every process stops on

    def due(self, sync_point: bool) -> bool:
        """Whether to stop now: the same answer on every process."""
        import jax

        if self.agreed is None and (sync_point or jax.process_count() == 1):
            self.agreed = distributed.any_signal(self.signal)
        return self.agreed is not None

    def __call__(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle the signals for the duration (main thread only; elsewhere, leave them)."""
        try:
            previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
        except ValueError:  # not the main thread (e.g. a notebook's worker thread)
            previous = {}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
