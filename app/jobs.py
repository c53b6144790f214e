"""Job queues: Celery on Redis in production, an in-process worker thread as the embedded default.

Both deliver only a job id to ``run_verification``. The API enqueues after its transaction
commits and records ``enqueued_at``; a sweeper thread re-sends jobs that were committed but
never reached the broker and running jobs whose worker died (expired lease).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Protocol

from sqlalchemy import update

from app.models import Verification, utcnow
from app.runtime import Runtime
from app.services.verification import run_verification, stranded_jobs

log = logging.getLogger("findlady.jobs")


class JobQueue(Protocol):
    def enqueue(self, job_id: str) -> None: ...
    def ping(self) -> str | None: ...  # None when healthy, else the reason
    def start(self) -> None: ...
    def stop(self) -> None: ...


def mark_enqueued(runtime: Runtime, job_id: str) -> None:
    with runtime.sessions() as session:
        session.execute(update(Verification).where(Verification.id == job_id).values(enqueued_at=utcnow()))
        session.commit()


def unmark_enqueued(runtime: Runtime, job_ids: list[str]) -> None:
    with runtime.sessions() as session:
        session.execute(update(Verification).where(Verification.id.in_(job_ids)).values(enqueued_at=None))
        session.commit()


class ThreadQueue:
    """In-process workers: a ``queue.Queue`` of ids and ``worker_threads`` daemon threads."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._q: queue.Queue[str | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._timers: set[threading.Timer] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def enqueue(self, job_id: str) -> None:
        self._q.put(job_id)

    def ping(self) -> str | None:
        dead = [t.name for t in self._threads if not t.is_alive()]
        return f"worker threads not running: {', '.join(dead)}" if dead or not self._threads else None

    def start(self) -> None:
        for i in range(self.runtime.settings.worker_threads):
            t = threading.Thread(target=self._work, name=f"findlady-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        # The in-memory queue is empty after a restart: take back every queued job.
        for job_id in stranded_jobs(self.runtime, all_queued=True):
            self.enqueue(job_id)

    def stop(self) -> None:
        self._stopping = True
        with self._lock:
            for timer in self._timers:
                timer.cancel()
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join(timeout=30)

    def _later(self, job_id: str, seconds: float) -> None:
        def fire() -> None:
            with self._lock:
                self._timers.discard(timer)
            if not self._stopping:
                self.enqueue(job_id)

        timer = threading.Timer(seconds, fire)
        timer.daemon = True
        with self._lock:
            self._timers.add(timer)
        timer.start()

    def _work(self) -> None:
        while True:
            job_id = self._q.get()
            if job_id is None:
                return
            try:
                outcome = run_verification(job_id=job_id, runtime=self.runtime)
                if outcome.retry_in is not None:
                    self._later(job_id, outcome.retry_in)
            except Exception:  # keep the worker alive; the sweeper re-sends the job later
                log.exception("job %s: worker error", job_id)


class CeleryQueue:
    """Publishes ``findlady.verify`` tasks to the Celery broker (Redis)."""

    def __init__(self, runtime: Runtime) -> None:
        from workers.celery_app import make_celery

        self.runtime = runtime
        self.celery = make_celery(runtime.settings)

    def enqueue(self, job_id: str) -> None:
        self.celery.send_task("findlady.verify", args=[job_id], queue=self.runtime.settings.queue_name)

    def ping(self) -> str | None:
        try:
            with self.celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
                client = getattr(conn.default_channel, "client", None)
                if client is not None and hasattr(client, "ping"):
                    client.ping()
        except Exception as e:
            return f"broker unreachable: {type(e).__name__}: {e}"
        return None

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.celery.close()


def make_queue(runtime: Runtime) -> JobQueue:
    return CeleryQueue(runtime) if runtime.settings.broker_url else ThreadQueue(runtime)


class Sweeper:
    """Every ``sweep_interval`` seconds, re-send stranded jobs (see ``stranded_jobs``)."""

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
