"""Clean shutdown of a Celery worker: a running job is handed back, not waited for.

Celery's warm shutdown (SIGTERM or the first Ctrl+C to the main process) stops consuming and
waits for running tasks. Our task returns at once instead: the job is handed back (queued,
lease released, attempt not counted, ``verification.handed_back`` in the audit trail) and the
task re-sent to the broker, so the next worker takes it without waiting for a lease.

* Main process: on ``worker_shutting_down`` it stops a job running in-process (solo and
  threads pools) and passes SIGTERM on to its pool processes (a ``docker stop`` or ``kill``
  reaches the main process only).
* Pool process: while a job runs (``job_running``), SIGTERM stops the job instead of killing
  the process. With no job running the signal keeps its old meaning, so the pool's own
  terminate still ends an idle child.

``FINDLADY_DRAIN_SECONDS`` > 0: running jobs get that long to finish before they are stopped.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from app.jobs.shutdown import StopSignal

log = logging.getLogger("findlady.worker")

STOP = StopSignal()  # this process's: the task passes it to run_verification
_state = {"running": 0, "pool_child": False}


def stop_jobs(reason: str) -> None:
    from app.core.config import Settings

    drain = Settings().drain_seconds
    if _state["running"]:
        log.info("%s: %s the running job", reason,
                 f"giving it {drain:.0f} s, then handing back" if drain > 0 else "handing back")
    STOP.request(drain)


def _child_sigterm(signum: int, frame: Any) -> None:
    stop_jobs("SIGTERM")


def mark_pool_child() -> None:
    """Called in each pool process (``worker_process_init``)."""
    _state["pool_child"] = True


@contextmanager
def job_running() -> Iterator[None]:
    """Around one task: in a pool process, SIGTERM stops the job instead of killing the process.

    Installed per job, not at process start: billiard sets its own SIGTERM handler after
    ``worker_process_init``, and an idle child should keep dying on SIGTERM as it always did.
    In the main process (solo pool) Celery's own handler stays: it starts the warm shutdown,
    whose ``worker_shutting_down`` stops the job.
    """
    install = _state["pool_child"] and threading.current_thread() is threading.main_thread()
    if install:
        # A SIGTERM to this pool process alone stopped its last job, not the process: the
        # next job runs. (In a shutdown the main process starts no further job.)
        STOP.clear()
    previous = signal.signal(signal.SIGTERM, _child_sigterm) if install else None
    _state["running"] += 1
    try:
        yield
    finally:
        _state["running"] -= 1
        if install:
            signal.signal(signal.SIGTERM, previous)


def on_worker_shutting_down(**_: Any) -> None:
    """In the main process, when Celery's warm or cold shutdown begins."""
    from billiard.process import active_children

    stop_jobs("worker shutting down")
    for child in active_children():
        try:
            os.kill(child.pid, signal.SIGTERM)
        except (ProcessLookupError, TypeError):  # gone already, or never started
            pass
