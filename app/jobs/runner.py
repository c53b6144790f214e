"""Running one verification job: the only code a worker executes (Celery task or thread).

The job's state lives in our table, not in the broker, so redelivery is safe:

* a conditional UPDATE claims the job (queued -> running, or a running job whose lease has
  expired -> running), counting the attempt; anyone else sees a live lease and backs off;
* while the job runs, a heartbeat renews its lease; a dead worker stops renewing, so the
  next delivery (Celery's redelivery or the sweeper) takes over after ``lease_seconds``;
* the result is written only if this attempt still holds the job (fenced on ``attempts``),
  with its audit events, in one transaction; a finished job is a no-op;
* the core reports progress (``app.jobs.progress``: stored as ``{phase, done, total}``); when
  the worker shuts down the next report raises ``StopRequested`` and the job is handed back
  (queued, lease released, the attempt not counted, ``verification.handed_back`` audited).

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
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Executable, and_, or_, update
from sqlalchemy.orm import Session

from app import audit
from app.audit import canonical_json
from app.jobs.lease import Heartbeat, held_by
from app.jobs.progress import JobProgress
from app.jobs.shutdown import StopRequested, StopSignal
from app.logs import job_context
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


def run_verification(*, job_id: str, runtime: Runtime, stop: StopSignal | None = None) -> Outcome:
    """Claim job ``job_id``, verify the suspect against its reference, store the report.

    When ``stop`` is set while the job runs (its worker shuts down), the job is handed back
    (``_hand_back``) at the core's next progress report.
    """
    token = job_context.set(job_id)  # every log line of this job carries its id
    try:
        return _run(runtime, job_id, stop)
    finally:
        job_context.reset(token)


def _run(runtime: Runtime, job_id: str, stop: StopSignal | None) -> Outcome:
    if stop is not None and stop.is_set():
        return Outcome("stopped")
    waiting = _reference_not_ready(runtime, job_id)
    if waiting is not None:
        return waiting
    claimed = _claim(runtime, job_id)
    if isinstance(claimed, Outcome):
        return claimed
    attempt = claimed
    heartbeat = Heartbeat(runtime, job_id, attempt)
    heartbeat.start()
    t0 = time.perf_counter()
    try:
        report, resynced, visuals = _compute(runtime, job_id, progress=JobProgress(runtime, job_id, attempt, stop))
    except StopRequested:
        return _hand_back(runtime, job_id, attempt)
    except Exception as e:
        return _on_error(runtime, job_id, attempt, e)
    finally:
        heartbeat.stop()
    computed = time.perf_counter() - t0
    outcome = _finish(runtime, job_id, attempt, report, resynced, visuals)
    log.info("job %s: %.1f s computing, %.1f s storing the result", job_id, computed,
             time.perf_counter() - t0 - computed)
    return outcome


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
                held_by(job_id, job.attempts)
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


def _store_resynced(runtime: Runtime, state_dict: Mapping[str, Any]) -> tuple[str, bool]:
    """The re-synchronized suspect as a safetensors blob (downloaded by the reference's owner);
    a lazy ``PermutedStateDict`` is written tensor by tensor, never held whole."""
    import secrets

    from findlady_core.io import save_state_dict
    from findlady_core.lazy import PermutedStateDict

    tmp = runtime.blobs.tmp_dir / f"resynced-{secrets.token_hex(12)}.safetensors"
    try:
        if isinstance(state_dict, PermutedStateDict):
            state_dict.save(tmp)
        else:
            save_state_dict(state_dict, tmp)
        return runtime.blobs.add_file(tmp)
    finally:
        tmp.unlink(missing_ok=True)


def _compute(
    runtime: Runtime, job_id: str, progress: JobProgress
) -> tuple[dict[str, Any], tuple[str, bool] | None, dict[str, Any] | None]:
    """The report, the stored re-synchronized suspect, and the dashboard's pictures (None if drawing
    them failed: they are not evidence)."""
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
        ref_id, ref_config = ref.id, ref.config
    t0 = time.perf_counter()
    sizes = [_size(ref_path), _size(sus_path)]
    progress("load", 0, sum(sizes))
    reference = load_state_dict(ref_path, mmap=True)  # memory-mapped: the page cache holds the bytes
    progress("load", sizes[0], sum(sizes))
    suspect = load_state_dict(sus_path, mmap=True)
    key = load_key(key_path) if key_path is not None else None
    progress("load", sum(sizes), sum(sizes))
    load_seconds = time.perf_counter() - t0
    null_seconds = 0.0
    if stored_null is None:
        # Registered before the null was stored, or by another solver version: pay it once.
        t0 = time.perf_counter()
        stored_null = reference_null_margin(reference, spec, key, device=runtime.settings.device, progress=progress)
        null_seconds = time.perf_counter() - t0
        store_null(runtime, ref_id, stored_null)
        log.info("job %s: recomputed the null of reference %s (%.1f s)", job_id, ref_id, null_seconds)
    resynced: list[tuple[str, bool]] = []
    pictures: list[dict[str, Any] | None] = []
    rotation = _rotation_family(ref_config, reference)
    report = verify(
        reference, suspect, spec, key=key, device=runtime.settings.device,
        reference_info=ref_info, suspect_info=sus_info, null_margin=stored_null, progress=progress,
        load_seconds=load_seconds,
        on_resynced=lambda sd: resynced.append(_store_resynced(runtime, sd)),
        evidence=lambda r, integ: pictures.append(_visuals(job_id, r, integ, key, suspect)),
        rotation=rotation,
    )
    report["timings"]["null"] = null_seconds  # what this job spent on the null (0: it was stored)
    visuals = None
    if pictures and pictures[0] is not None:
        # the matrices are strict JSON already (visuals._rounded); the rest is walked
        doc = pictures[0]
        visuals = {**json_safe({k: v for k, v in doc.items() if k != "matrices"}), "matrices": doc["matrices"]}
    return json_safe(report), (resynced[0] if resynced else None), visuals


def _rotation_family(config: dict[str, Any] | None, reference: dict[str, Any]) -> Any:
    """The residual stream of a reference registered with its config.json, when its family has a
    rotation symmetry (RMSNorm, pre-LayerNorm): a suspect's rotation is then estimated and undone."""
    if config is None:
        return None
    from findlady_core.errors import InputError
    from findlady_core.rotation import family_from_config

    try:
        return family_from_config(config, reference.keys())
    except InputError:  # post-LN (BERT), CNNs, families without the symmetry: permutations only
        return None


def _visuals(job_id: str, result: Any, integrity: Any, key: Any, suspect: Any) -> dict[str, Any] | None:
    from findlady_core import visuals

    try:
        return visuals.build(result, integrity, key=key, suspect=suspect)
    except Exception:  # a picture that cannot be drawn must not fail the verification
        log.exception("job %s: could not build the visuals", job_id)
        return None


def _size(path: Any) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


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


def _finish(runtime: Runtime, job_id: str, attempt: int, report: dict[str, Any],
            resynced: tuple[str, bool] | None = None, visuals: dict[str, Any] | None = None) -> Outcome:
    now = utcnow()
    digest = hashlib.sha256(canonical_json(report).encode()).hexdigest()
    with runtime.sessions() as session:
        res = _updated(
            session,
            held_by(job_id, attempt)
            .values(status=JobStatus.SUCCEEDED, report=report, visuals=visuals, error=None, finished_at=now,
                    lease_expires_at=None, resynced_sha256=resynced[0] if resynced else None,
                    progress=None, verdict=str(report.get("verdict")), timings=report.get("timings"))
        )
        if res != 1:  # (a stored re-synchronized blob stays: the attempt that took over may share it)
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
            held_by(job_id, attempt)
            .values(error=error, lease_expires_at=None, progress=None, **values)
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


def _hand_back(runtime: Runtime, job_id: str, attempt: int) -> Outcome:
    """The worker is shutting down: put the job back in the queue, lease released, and this
    attempt not counted (it did not fail: it was interrupted). The caller re-sends it."""
    with runtime.sessions() as session:
        res = _updated(
            session,
            held_by(job_id, attempt)
            .values(status=JobStatus.QUEUED, attempts=attempt - 1, lease_expires_at=None, started_at=None,
                    progress=None, enqueued_at=utcnow())
        )
        if res != 1:
            session.rollback()
            return Outcome("superseded")
        audit.append(session, runtime.secret, "verification.handed_back",
                     {"attempt": attempt, "reason": "worker shutdown"}, job_id)
        session.commit()
    log.info("job %s: attempt %d handed back (worker shutting down); it stays queued", job_id, attempt)
    return Outcome("handed_back", retry_in=0.0)
