"""A job's progress callback: stores ``{phase, done, total}`` and checks for a shutdown.

Passed to the core as ``progress=`` (``findlady_core.progress``). Writes are throttled (on a
phase change, else at most every ``interval`` seconds) and fenced on the attempt, like the
heartbeat, so a superseded attempt cannot overwrite the live one's progress. A failed write is
logged and skipped: progress is informative, the job goes on.
"""

from __future__ import annotations

import logging
import time

from app.jobs.lease import held_by
from app.jobs.shutdown import StopRequested, StopSignal
from app.runtime import Runtime

log = logging.getLogger("findlady.jobs")


class JobProgress:
    def __init__(self, runtime: Runtime, job_id: str, attempt: int, stop: StopSignal | None,
                 interval: float = 1.0) -> None:  # fmt: skip
        self.runtime, self.job_id, self.attempt, self.stop = runtime, job_id, attempt, stop
        self.interval = interval
        self.phase: str | None = None
        self.last_write = 0.0
        self.delayed = False

    def check(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise StopRequested()

    def __call__(self, phase: str, done: int, total: int) -> None:
        self.check()
        now = time.monotonic()
        if phase != self.phase:
            self.phase, self.last_write = phase, 0.0
        if now - self.last_write >= self.interval or done >= total:
            self.write(phase, done, total)
            self.last_write = now
        delay = self.runtime.settings.test_job_delay
        if delay and phase == "resync" and not self.delayed:
            # Test hook: hold the job inside the core's loop, where a shutdown must reach it.
            self.delayed = True
            if self.stop is not None and self.stop.wait(delay):
                raise StopRequested()
            if self.stop is None:
                time.sleep(delay)

    def write(self, phase: str, done: int, total: int) -> None:
        try:
            with self.runtime.sessions() as session:
                session.execute(held_by(self.job_id, self.attempt)
                                .values(progress={"phase": phase, "done": int(done), "total": int(total)}))
                session.commit()
        except Exception:  # noqa: BLE001 - see the module doc
            log.warning("job %s: could not store its progress", self.job_id, exc_info=True)
