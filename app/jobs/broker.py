"""The Celery application (Redis broker), configured from ``Settings``.

The API publishes with it (``send_task`` by name: the API never imports the task code) and
``workers.celery_app`` runs the worker with it.

Delivery is at-least-once and the job table makes it exactly-once in effect: late acks, one
prefetched task per process, redelivery when a worker process dies, JSON only, no result
backend (job state lives in our database), time limits below the broker's visibility timeout.
"""

from __future__ import annotations

from celery import Celery

from app.core.config import Settings

VERIFY_TASK = "findlady.verify"  # the one task: run a verification job by id


def make_celery(settings: Settings) -> Celery:
    app = Celery("findlady", broker=settings.broker_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_soft_time_limit=settings.job_soft_time_limit,
        task_time_limit=settings.job_hard_time_limit,
        # Redis redelivers an unacknowledged task after this many seconds: above the longest job.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        task_default_queue=settings.queue_name,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )
    return app
