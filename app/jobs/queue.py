"""Job queues: Celery on Redis in production, an in-process worker thread as the embedded default.

Both deliver only a job id to ``app.jobs.runner.run_verification``. The API enqueues after its
transaction commits and records ``enqueued_at``; the sweeper (``app.jobs.sweeper``) re-sends
jobs that were committed but never reached the broker and running jobs whose worker died
(expired lease): ``stranded_jobs`` says which.
"""

from __future__ import annotations

import logging
import queue
import threading
from datetime import timedelta
from typing import Protocol

from sqlalchemy import and_, or_, select, update

from app.jobs.runner import run_verification
from app.jobs.shutdown import StopSignal
from app.models import JobStatus, Verification, utcnow
from app.runtime import Runtime

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


def stranded_jobs(runtime: Runtime, *, all_queued: bool = False) -> list[str]:
    """Jobs to hand to the queue again, marking them as sent now.

    Queued jobs that never reached the broker (``enqueued_at`` unset after ``requeue_after``),
    queued jobs whose message may have been lost (sent longer ago than the broker's visibility
    timeout), and running jobs whose lease expired (their worker died). ``all_queued`` takes
    every queued job: an in-process queue starts empty after a restart.
    """
    s = runtime.settings
    now = utcnow()
    soon = now - timedelta(seconds=s.requeue_after)
    long_ago = now - timedelta(seconds=s.visibility_timeout)
    V = Verification
    queued = V.status == JobStatus.QUEUED
    if not all_queued:
        queued = and_(queued, or_(and_(V.enqueued_at.is_(None), V.created_at < soon), V.enqueued_at < long_ago))
    expired = and_(V.status == JobStatus.RUNNING, V.lease_expires_at < now,
                   or_(V.enqueued_at.is_(None), V.enqueued_at < soon))
    with runtime.sessions() as session:
        ids = list(session.scalars(select(V.id).where(or_(queued, expired)).order_by(V.created_at).limit(1000)))
        if ids:
            session.execute(update(V).where(V.id.in_(ids)).values(enqueued_at=now))
        session.commit()
    return ids


class ThreadQueue:
    """In-process workers: a ``queue.Queue`` of ids and ``worker_threads`` daemon threads.

    ``stop`` (the API's shutdown) takes no new job and hands running ones back at once, or
    after ``drain_seconds`` (``app.jobs.shutdown``); queued ids are simply dropped: the jobs
    stay ``queued`` in the table and ``start`` takes them back.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._q: queue.Queue[str | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._timers: set[threading.Timer] = set()
        self._lock = threading.Lock()
        self._stopping = False
        self.stop_signal = StopSignal()

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
        drain = self.runtime.settings.drain_seconds
        if drain > 0 and any(t.is_alive() for t in self._threads):
            log.info("shutdown: waiting up to %.0f s for running jobs (FINDLADY_DRAIN_SECONDS)", drain)
        self.stop_signal.request(drain)
        for t in self._threads:
            t.join(timeout=drain + 30)

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
            if self._stopping:  # shutting down: leave it queued in the table for the next start
                continue
            try:
                outcome = run_verification(job_id=job_id, runtime=self.runtime, stop=self.stop_signal)
                if outcome.retry_in is not None:
                    self._later(job_id, outcome.retry_in)
            except Exception:  # keep the worker alive; the sweeper re-sends the job later
                log.exception("job %s: worker error", job_id)


class CeleryQueue:
    """Publishes ``findlady.verify`` tasks to the Celery broker (Redis), by name."""

    def __init__(self, runtime: Runtime) -> None:
        from app.jobs.broker import make_celery  # Celery loads only when a broker is configured

        self.runtime = runtime
        self.celery = make_celery(runtime.settings)

    def enqueue(self, job_id: str) -> None:
        from app.jobs.broker import VERIFY_TASK

        self.celery.send_task(VERIFY_TASK, args=[job_id], queue=self.runtime.settings.queue_name)

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
