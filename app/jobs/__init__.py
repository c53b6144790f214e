"""Verification jobs, in one place.

* ``queue``: how a job id reaches a worker (Celery by task name, or in-process threads), and
  which jobs need sending again;
* ``sweeper``: the thread that re-sends stranded jobs;
* ``runner``: running one job by id (the only code a worker executes);
* ``broker``: the Celery application's configuration, shared by the publisher and ``workers``.

Nothing here imports FastAPI: a Celery worker loads this package and not the web framework.
"""
