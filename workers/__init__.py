"""The Celery worker: a thin shell over ``app.jobs.runner`` (``findlady worker`` starts it)."""
