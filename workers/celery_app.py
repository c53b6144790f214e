"""The Celery application of the workers. Start a worker with ``findlady worker`` or
``celery -A workers.celery_app worker``; settings come from ``FINDLADY_*`` variables and the
configuration from ``app.jobs.broker.make_celery``.
"""

from __future__ import annotations

from celery.signals import setup_logging, worker_process_init, worker_shutting_down

from app.core.config import Settings
from app.jobs.broker import make_celery
from workers import shutdown

celery_app = make_celery(Settings())
celery_app.conf.include = ["workers.tasks"]
app = celery_app  # `celery -A workers.celery_app` looks for `app` or `celery`


@setup_logging.connect
def _logging(loglevel: object = None, **_: object) -> None:
    """Our format (FINDLADY_LOG_FORMAT: text or json) for the worker's and Celery's lines."""
    from app import logs

    logs.configure(loglevel if isinstance(loglevel, (int, str)) and loglevel else "INFO")


@worker_process_init.connect
def _fresh_runtime(**_: object) -> None:
    """A forked pool process must not reuse the parent's database connections; its SIGTERM
    hands the running job back (``workers.shutdown``)."""
    from workers import tasks

    tasks.reset_runtime()
    shutdown.mark_pool_child()


worker_shutting_down.connect(shutdown.on_worker_shutting_down)
