"""Running one verification job: the only code a worker executes (Celery task or thread).

The job's state lives in our table, not in the broker, so redelivery is safe:

* a conditional UPDATE claims the job (queued -> running, or a running job whose lease has
  expired -> running), counting the attempt; anyone else sees a live lease and backs off;
* while the job runs, a heartbeat renews its lease; a dead worker stops renewing, so the
  next delivery (Celery's redelivery or the sweeper) takes over after ``lease_seconds``;
* the result is written only if this attempt still holds the job (fenced on ``attempts``),
  with its audit events, in one transaction; a finished job is a no-op.

The reference's null margin was stored at registration (``app.services.nulls``); a job
recomputes and stores it only when the solver changed since (one re-synchronization per job).
A job against a reference still ``preparing`` (its null computed in the background,
``app.services.prepare``) is not claimed: it stays queued and is delivered again after
``prepare_poll_seconds``; against a ``failed`` reference it fails with the reference's reason.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Executable, and_, or_, update
from sqlalchemy.orm import Session

from app import audit
from app.audit import canonical_json
from app.models import JobStatus, Reference, ReferenceStatus, Verification, as_utc, utcnow
from app.runtime import Runtime
from app.services.nulls import null_is_current, reference_null_margin, store_null

log = logging.getLogger("findlady.jobs")


def _updated(session: Session, stmt: Executable) -> int:
    """Run an UPDATE and return how many rows it changed (0: someone else got there first)."""
    return cast(CursorResult[Any], session.execute(stmt)).rowcount


@dataclass(frozen=True)
class Outcome:
    """What happened: succeeded, failed, requeued, busy, noop (already finished), missing.

    ``retry_in`` (seconds) asks the caller to deliver the job again later.
    """

    status: str
    retry_in: float | None = None


def run_verification(*, job_id: str, runtime: Runtime) -> Outcome:
    """Claim job ``job_id``, verify the suspect against its reference, store the report."""
    s = runtime.settings
    waiting = _reference_not_ready(runtime, job_id)
    if waiting is not None:
        return waiting
    claimed = _claim(runtime, job_id)
    if isinstance(claimed, Outcome):
        return claimed
    attempt = claimed
    heartbeat = _Heartbeat(runtime, job_id, attempt)
    heartbeat.start()
    try:
        if s.test_job_delay:
            time.sleep(s.test_job_delay)  # test hook: keeps a job running long enough to kill its worker
        report = _compute(runtime, job_id)
    except Exception as e:
        return _on_error(runtime, job_id, attempt, e)
    finally:
        heartbeat.stop()
    return _finish(runtime, job_id, attempt, report)


def _reference_not_ready(runtime: Runtime, job_id: str) -> Outcome | None:
    """None when the job's reference is ready; else wait (preparing) or fail the job (failed)."""
    with runtime.sessions() as session:
        job = session.get(Verification, job_id)
        if job is None or JobStatus(job.status).finished or job.status != JobStatus.QUEUED:
            return None  # _claim decides
        ref = session.get(Reference, job.reference_id)
        if ref is None or ref.status == ReferenceStatus.READY:
            return None
        if ref.status == ReferenceStatus.PREPARING:
            return Outcome("waiting", retry_in=runtime.settings.prepare_poll_seconds)
        reason = ref.status_error or {}
        error = {"code": "reference_failed",
                 "message": f"the reference could not be prepared: {reason.get('message', 'unknown reason')}"[:2000]}
        done = _updated(session, update(Verification)
                        .where(Verification.id == job_id, Verification.status == JobStatus.QUEUED)
                        .values(status=JobStatus.FAILED, finished_at=utcnow(), error=error))
        if done == 1:
            audit.append(session, runtime.secret, "verification.failed",
                         {"attempt": job.attempts, "code": "reference_failed"}, job_id)
        session.commit()
        return Outcome(JobStatus.FAILED)


def _claim(runtime: Runtime, job_id: str) -> int | Outcome:
    s = runtime.settings
    now = utcnow()
    with runtime.sessions() as session:
        job = session.get(Verification, job_id)
        if job is None:
            log.warning("job %s does not exist", job_id)
            return Outcome("missing")
        if JobStatus(job.status).finished:
            return Outcome("noop")
        lease = as_utc(job.lease_expires_at)
        if job.status == JobStatus.RUNNING and lease is not None and lease > now:
            return Outcome("busy", retry_in=(lease - now).total_seconds() + 1.0)
        if job.status == JobStatus.RUNNING and job.attempts >= s.job_max_attempts:
            # The last allowed attempt died with its worker: give up and say so.
            done = _updated(
                session,
                update(Verification)
                .where(Verification.id == job_id, Verification.status == JobStatus.RUNNING,
                       Verification.attempts == job.attempts)
                .values(
                    status=JobStatus.FAILED, finished_at=now, lease_expires_at=None,
                    error={"code": "worker_lost", "message": f"the worker died during each of {job.attempts} attempts"},
                )
            )
            if done == 1:
                audit.append(session, runtime.secret, "verification.failed",
                             {"attempt": job.attempts, "code": "worker_lost"}, job_id)
            session.commit()
            return Outcome(JobStatus.FAILED)
        takeover = job.status == JobStatus.RUNNING
        attempt = job.attempts + 1
        res = _updated(
            session,
            update(Verification)
            .where(
                Verification.id == job_id,
                Verification.attempts == job.attempts,
                or_(
                    Verification.status == JobStatus.QUEUED,
                    and_(Verification.status == JobStatus.RUNNING, Verification.lease_expires_at < now),
                ),
            )
            .values(
                status=JobStatus.RUNNING, attempts=attempt, started_at=now,
                lease_expires_at=now + timedelta(seconds=s.lease_seconds),
            )
        )
        if res != 1:
            session.rollback()
            return Outcome("busy", retry_in=1.0)
        audit.append(session, runtime.secret, "verification.started",
                     {"attempt": attempt, "takeover": takeover}, job_id)
        session.commit()
    log.info("job %s: attempt %d started%s", job_id, attempt, " (took over an expired lease)" if takeover else "")
    return attempt


def _compute(runtime: Runtime, job_id: str) -> dict[str, Any]:
    from findlady_core.io import load_state_dict
    from findlady_core.report import verify
    from findlady_core.spec import Spec
    from findlady_core.watermark import load_key

    with runtime.sessions() as session:
        job = session.get(Verification, job_id)
        assert job is not None
        ref = session.get(Reference, job.reference_id)
        assert ref is not None
        spec = Spec.from_dict(ref.spec)
        ref_info = {"id": ref.id, "sha256": ref.sha256, "name": ref.name, "version": ref.version}
        sus_info = {"sha256": job.suspect_sha256}
        ref_path, sus_path = runtime.blobs.path(ref.sha256), runtime.blobs.path(job.suspect_sha256)
        key_path = runtime.blobs.path(ref.key_sha256) if ref.key_sha256 else None
        stored_null = ref.null_margin if null_is_current(ref) else None
        ref_id = ref.id
    t0 = time.perf_counter()
    reference = load_state_dict(ref_path, mmap=True)  # memory-mapped: the page cache holds the bytes
    suspect = load_state_dict(sus_path, mmap=True)
    key = load_key(key_path) if key_path is not None else None
    load_seconds = time.perf_counter() - t0
    null_seconds = 0.0
    if stored_null is None:
        # Registered before the null was stored, or by another solver version: pay it once.
        t0 = time.perf_counter()
        stored_null = reference_null_margin(reference, spec, key, device=runtime.settings.device)
        null_seconds = time.perf_counter() - t0
        store_null(runtime, ref_id, stored_null)
        log.info("job %s: recomputed the null of reference %s (%.1f s)", job_id, ref_id, null_seconds)
    report = verify(
        reference, suspect, spec, key=key, device=runtime.settings.device,
        reference_info=ref_info, suspect_info=sus_info, null_margin=stored_null, load_seconds=load_seconds,
    )
    report["timings"]["null"] = null_seconds  # what this job spent on the null (0: it was stored)
    return json_safe(report)


def json_safe(value: Any) -> Any:
    """The report as strict JSON: non-finite floats become None (JSON has no NaN/Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return json_safe(value.item())
    return value


def _finish(runtime: Runtime, job_id: str, attempt: int, report: dict[str, Any]) -> Outcome:
    now = utcnow()
    digest = hashlib.sha256(canonical_json(report).encode()).hexdigest()
    with runtime.sessions() as session:
        res = _updated(
            session,
            update(Verification)
            .where(Verification.id == job_id, Verification.status == JobStatus.RUNNING,
                   Verification.attempts == attempt)
            .values(status=JobStatus.SUCCEEDED, report=report, error=None, finished_at=now, lease_expires_at=None)
        )
        if res != 1:
            # Our lease expired and another attempt took over: its result will count, not ours.
            session.rollback()
            log.warning("job %s: attempt %d lost its lease; result dropped", job_id, attempt)
            return Outcome("superseded")
        audit.append(session, runtime.secret, "verification.succeeded",
                     {"attempt": attempt, "verdict": str(report.get("verdict")), "report_sha256": digest}, job_id)
        session.commit()
    log.info("job %s: succeeded (%s)", job_id, report.get("verdict"))
    return Outcome(JobStatus.SUCCEEDED)


def _on_error(runtime: Runtime, job_id: str, attempt: int, exc: Exception) -> Outcome:
    """Bad input fails at once; other errors are retried until ``job_max_attempts``."""
    from celery.exceptions import SoftTimeLimitExceeded

    from findlady_core.errors import InputError

    s = runtime.settings
    if isinstance(exc, InputError):
        error, permanent = {"code": exc.code, "message": str(exc)}, True
    elif isinstance(exc, SoftTimeLimitExceeded):
        error = {"code": "time_limit", "message": f"the job ran past {s.job_soft_time_limit} s"}
        permanent = True
    else:
        error = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"[:2000]}
        permanent = attempt >= s.job_max_attempts
        log.exception("job %s: attempt %d failed", job_id, attempt, exc_info=exc)
    now = utcnow()
    values: dict[str, Any] = (
        {"status": JobStatus.FAILED, "finished_at": now} if permanent
        else {"status": JobStatus.QUEUED, "enqueued_at": now}
    )
    with runtime.sessions() as session:
        res = _updated(
            session,
            update(Verification)
            .where(Verification.id == job_id, Verification.status == JobStatus.RUNNING,
                   Verification.attempts == attempt)
            .values(error=error, lease_expires_at=None, **values)
        )
        if res != 1:
            session.rollback()
            return Outcome("superseded")
        kind = "verification.failed" if permanent else "verification.retry"
        audit.append(session, runtime.secret, kind, {"attempt": attempt, "code": error["code"]}, job_id)
        session.commit()
    if permanent:
        return Outcome(JobStatus.FAILED)
    return Outcome("requeued", retry_in=min(60.0, 2.0**attempt))


class _Heartbeat:
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
                    session.execute(
                        update(Verification)
                        .where(Verification.id == self.job_id, Verification.status == JobStatus.RUNNING,
                               Verification.attempts == self.attempt)
                        .values(lease_expires_at=utcnow() + timedelta(seconds=lease))
                    )
                    session.commit()
            except Exception:  # a missed beat is retried next time; the lease has slack
                log.exception("job %s: lease renewal failed", self.job_id)
