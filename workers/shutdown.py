"""Clean shutdown of a Celery worker: a running job is handed back, not waited for.

Celery's warm shutdown (SIGTERM or the first Ctrl+C to the main process) stops consuming and
waits for running tasks. Our task returns at once instead: the job is handed back (queued,
lease released, attempt not counted, ``verification.handed_back`` in the audit trail) and the
task re-sent to the broker, so the next worker takes it without waiting for a lease.

* Main process: on ``worker_shutting_down`` it stops a job running in-process (solo and
  threads pools) and passes SIGTERM on to its pool processes (a ``docker stop`` or ``kill``
  reaches the main process only).
* Pool process: Celery resets SIGTERM to "die" in each child; ``install_child_handler`` makes
  it stop the running job instead. With no job running the signal keeps its old meaning, so
  the pool's own terminate still ends an idle child.

``FINDLADY_DRAIN_SECONDS`` > 0: running jobs get that long to finish before they are stopped.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from app.jobs.shutdown import StopSignal

log = logging.getLogger("findlady.worker")

STOP = StopSignal()  # this process's: the task passes it to run_verification
_running = [0]  # jobs running in this process (a list: changed from the task module)


def job_started() -> None:
    _running[0] += 1


def job_ended() -> None:
    _running[0] -= 1


def _drain_seconds() -> float:
    from app.core.config import Settings

    return Settings().drain_seconds


def stop_jobs(reason: str) -> None:
    drain = _drain_seconds()
    if _running[0]:
        log.info("%s: %s the running job", reason,
                 f"giving it {drain:.0f} s, then handing back" if drain > 0 else "handing back")
    STOP.request(drain)


def _child_sigterm(signum: int, frame: Any) -> None:
    if _running[0]:
        stop_jobs("SIGTERM")
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # idle: die as Celery's child would
    os.kill(os.getpid(), signal.SIGTERM)


def install_child_handler() -> None:
    """In a pool process (``worker_process_init``): SIGTERM stops the running job."""
    signal.signal(signal.SIGTERM, _child_sigterm)


def on_worker_shutting_down(**_: Any) -> None:
    """In the main process, when Celery's warm or cold shutdown begins."""
    from billiard.process import active_children

    stop_jobs("worker shutting down")
    for child in active_children():
        try:
            os.kill(child.pid, signal.SIGTERM)
        except (ProcessLookupError, TypeError):  # gone already, or never started
            pass
