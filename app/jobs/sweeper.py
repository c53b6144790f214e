"""The sweeper: a thread that re-sends stranded jobs (see ``app.jobs.queue.stranded_jobs``)."""

from __future__ import annotations

import logging
import threading

from app.jobs.queue import JobQueue, stranded_jobs, unmark_enqueued
from app.runtime import Runtime

log = logging.getLogger("findlady.jobs")


class Sweeper:
    """Every ``sweep_interval`` seconds, re-send stranded jobs."""

    def __init__(self, runtime: Runtime, jobs: JobQueue) -> None:
        self.runtime, self.jobs = runtime, jobs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="findlady-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def sweep_once(self) -> list[str]:
        ids = stranded_jobs(self.runtime)
        for i, job_id in enumerate(ids):
            log.info("sweeper: re-sending job %s", job_id)
            try:
                self.jobs.enqueue(job_id)
            except Exception:
                # The broker is down: un-mark the jobs not sent, so the next sweep tries them
                # again (marked as sent, they would wait out the visibility timeout, over an hour).
                unmark_enqueued(self.runtime, ids[i:])
                raise
        return ids

    def _run(self) -> None:
        while not self._stop.wait(self.runtime.settings.sweep_interval):
            try:
                self.sweep_once()
            except Exception:  # the database or broker may be down for a while
                log.exception("sweeper failed")
