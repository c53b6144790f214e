"""Celery workers: each task calls one service function with a job id."""
