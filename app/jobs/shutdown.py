"""Telling a running job to stop: the worker is shutting down and hands the job back.

The core computes in long loops that report progress (``findlady_core.progress``); the job's
progress callback (``app.jobs.progress.JobProgress``) checks a ``StopSignal`` at every report
and raises ``StopRequested``, which the runner turns into a hand-back: the job goes back to
``queued`` with its lease released and the attempt not counted, so the next worker (or this one
after a restart) takes it at once instead of waiting for a lease to expire.

``FINDLADY_DRAIN_SECONDS`` > 0 gives running jobs that long to finish before they are stopped.
"""

from __future__ import annotations

import threading


class StopRequested(Exception):
    """Raised inside a job when its worker shuts down (never an error of the job)."""


class StopSignal:
    """Set once when a worker should stop its jobs: at once, or after ``drain`` seconds."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._timer: threading.Timer | None = None

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True (early) when the stop came."""
        return self._event.wait(seconds)

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        """Forget a stop (and a pending drain): the process goes on taking jobs."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._event.clear()

    def request(self, drain_seconds: float = 0.0) -> None:
        """Stop running jobs now, or once ``drain_seconds`` have passed (a drain)."""
        if drain_seconds <= 0:
            self.set()
        elif self._timer is None:
            self._timer = threading.Timer(drain_seconds, self.set)
            self._timer.daemon = True
            self._timer.start()
