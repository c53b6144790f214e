"""The Celery application of the workers. Start a worker with ``findlady worker`` or
``celery -A workers.celery_app worker``; settings come from ``FINDLADY_*`` variables and the
configuration from ``app.jobs.broker.make_celery``.
"""

from __future__ import annotations

from celery.signals import worker_process_init

from app.core.config import Settings
from app.jobs.broker import make_celery

celery_app = make_celery(Settings())
celery_app.conf.include = ["workers.tasks"]
app = celery_app  # `celery -A workers.celery_app` looks for `app` or `celery`


@worker_process_init.connect
def _fresh_runtime(**_: object) -> None:
    """A forked pool process must not reuse the parent's database connections."""
    from workers import tasks

    tasks.reset_runtime()
