"""An attempt's hold on its job: the fenced update every write of the attempt goes through, and
the heartbeat that renews the lease.

A job row is the attempt's while it is ``running`` with that attempt number. Every write an
attempt makes (result, error, hand-back, progress, lease renewal) is an UPDATE fenced on both,
so an attempt whose lease expired and was taken over changes nothing: the one that took over
owns the row.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import Update, update

from app.models import JobStatus, Verification, utcnow
from app.runtime import Runtime

log = logging.getLogger("findlady.jobs")


def held_by(job_id: str, attempt: int) -> Update:
    """``UPDATE verifications ... WHERE`` the job is running as ``attempt`` (add ``.values``)."""
    return update(Verification).where(Verification.id == job_id, Verification.status == JobStatus.RUNNING,
                                      Verification.attempts == attempt)


class Heartbeat:
    """Renews the job's lease every ``lease_seconds / 3`` while this attempt holds it."""

    def __init__(self, runtime: Runtime, job_id: str, attempt: int) -> None:
        self.runtime, self.job_id, self.attempt = runtime, job_id, attempt
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id[:8]}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        lease = self.runtime.settings.lease_seconds
        while not self._stop.wait(lease / 3):
            try:
                with self.runtime.sessions() as session:
                    session.execute(held_by(self.job_id, self.attempt)
                                    .values(lease_expires_at=utcnow() + timedelta(seconds=lease)))
                    session.commit()
            except Exception:  # a missed beat is retried next time; the lease has slack
                log.exception("job %s: lease renewal failed", self.job_id)
