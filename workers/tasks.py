"""The one Celery task: ``findlady.verify`` runs a verification job by id."""

from __future__ import annotations

from app.core.config import Settings
from app.jobs.broker import VERIFY_TASK
from app.jobs.runner import run_verification
from app.runtime import Runtime
from workers import shutdown
from workers.celery_app import celery_app

_runtime: list[Runtime] = []  # one per worker process, built on first use (after fork)


def get_runtime() -> Runtime:
    if not _runtime:
        _runtime.append(Runtime.from_settings(Settings()))
    return _runtime[0]


def reset_runtime() -> None:
    _runtime.clear()


@celery_app.task(name=VERIFY_TASK, bind=True, max_retries=None, acks_late=True, reject_on_worker_lost=True)
def verify(self, job_id: str) -> str:  # type: ignore[no-untyped-def]
    """Run job ``job_id``; when it is held by a live lease, needs another attempt or was handed
    back by a shutdown, send it to the broker again (the next worker takes it)."""
    with shutdown.job_running():
        outcome = run_verification(job_id=job_id, runtime=get_runtime(), stop=shutdown.STOP)
    if outcome.status == "stopped":  # shutting down before it started: leave it to the next worker
        raise self.retry(countdown=0)
    if outcome.retry_in is not None:
        raise self.retry(countdown=outcome.retry_in)
    return outcome.status
