"""Verification jobs: submit a suspect against a reference, poll the job, read its audit trail.

A job is visible to its submitter and to the reference's owner; to anyone else it does not
exist (404).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from uuid import UUID

from fastapi import APIRouter, Query, Request
from sqlalchemy import and_, or_, select
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

from app import audit
from app.api.deps import ERRORS, SUBMITTERS, JobsDep, RuntimeDep, SessionDep, allow
from app.core.security import Principal
from app.errors import ApiError
from app.jobs.queue import mark_enqueued
from app.models import AuditEvent, JobStatus, Reference, Verification
from app.schemas import (AuditEventOut, AuditTrail, Status, VerificationDoc, VerificationOut, VerificationPage,
                         VerificationSummary)
from app.services import paging
from app.services.access import get_job, visible_jobs
from app.services.model_files import collect
from app.services.submissions import submit_verification
from app.uploads import read_multipart

log = logging.getLogger("findlady.api")
router = APIRouter(prefix="/v1/verifications", tags=["verifications"], responses=ERRORS)
RETRY_AFTER = "2"

SUBMIT_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["reference_id"],
                    "properties": {
                        "reference_id": {"type": "string", "format": "uuid"},
                        "suspect": {"type": "string", "format": "binary", "description": "safetensors or torch.save zip"},
                        "weights": {"type": "array", "items": {"type": "string", "format": "binary"},
                                    "description": "instead of suspect: the shards of a model folder, named as its index names them"},
                        "index": {"type": "string", "format": "binary", "description": "model.safetensors.index.json"},
                        "config": {"type": "string", "format": "binary", "description": "config.json"},
                        "archive": {"type": "string", "format": "binary",
                                    "description": "instead of suspect: a .zip or .tar of the model folder"},
                    },
                }
            }
        },
    }
}


INCLUDE = Query(None, description="'permutations': keep each group's permutation in the report (left out by default)")


def _out(job: Verification, include: str | None = None) -> VerificationOut:
    report = job.report
    if report is not None and include != "permutations":
        from findlady_core.report_format import without_permutations

        report = without_permutations(report)
    return VerificationOut(
        id=job.id, status=job.status, reference_id=job.reference_id, suspect_sha256=job.suspect_sha256,
        attempts=job.attempts, created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        report=report, error=job.error,
        progress=job.progress if job.status == JobStatus.RUNNING else None,
    )


@router.post("", status_code=202, response_model=VerificationDoc, openapi_extra=SUBMIT_SCHEMA,
             summary="Submit a suspect model for verification (owner, auditor)",
             responses={404: {"description": "no such reference visible to you"},
                        413: {"description": "upload too large"},
                        422: {"description": "bad weights, or shapes differ from the reference"}})
async def submit(request: Request, runtime: RuntimeDep, jobs: JobsDep,
                 principal: Principal = allow(*SUBMITTERS, action="submitting verifications")) -> JSONResponse:
    form = await read_multipart(request, files={"suspect", "index", "config", "archive"}, texts={"reference_id"},
                                repeat={"weights"}, store=runtime.blobs, max_bytes=runtime.settings.max_upload_bytes)
    suspect = None
    try:
        if "reference_id" not in form.texts:
            raise ApiError(422, "missing_field", "form field 'reference_id' is required")
        suspect = await run_in_threadpool(collect, runtime, form, "suspect")
        job = await run_in_threadpool(submit_verification, runtime, principal, form.texts["reference_id"], suspect)
    finally:
        if suspect is not None:
            suspect.discard()  # a staged folder not committed
        form.discard()
    # Committed: now hand the id to the queue. If the broker is down the job stays queued and
    # the sweeper sends it later; the client already has its id.
    try:
        await run_in_threadpool(jobs.enqueue, job.id)
        await run_in_threadpool(mark_enqueued, runtime, job.id)
    except Exception:
        log.exception("job %s: enqueue failed; the sweeper will retry", job.id)
    location = f"/v1/verifications/{job.id}"
    return JSONResponse(_out(job).model_dump(mode="json"), status_code=202,
                        headers={"Location": location, "Retry-After": RETRY_AFTER})


@router.get("", response_model=VerificationPage, summary="Jobs I submitted or that ran against my references, newest first")
def list_verifications(session: SessionDep, status: Status | None = None, reference_id: UUID | None = None,
                       limit: int = Query(paging.DEFAULT_LIMIT, ge=1, le=paging.MAX_LIMIT, description=paging.LIMIT_DOC),
                       cursor: str | None = Query(None, max_length=2000, description="next_cursor of the previous page"),
                       principal: Principal = allow(*SUBMITTERS, action="listing verifications")) -> VerificationPage:
    """Summaries only (no reports): read one job for its report."""
    verdict = Verification.report["verdict"].as_string()  # one JSON field, not the whole report
    q = (select(Verification.id, Verification.status, verdict, Verification.reference_id, Reference.name,
                Reference.version, Verification.suspect_sha256, Verification.attempts, Verification.created_at,
                Verification.started_at, Verification.finished_at)
         .join(Reference, Reference.id == Verification.reference_id).where(visible_jobs(principal)))
    if status is not None:
        q = q.where(Verification.status == status)
    if reference_id is not None:
        q = q.where(Verification.reference_id == str(reference_id))
    if cursor is not None:  # keyset on (created_at, id), newest first
        from datetime import datetime

        t, i = paging.decode(cursor, (str, str))
        try:
            when = datetime.fromisoformat(t)
        except ValueError:
            raise ApiError(422, "bad_cursor", "cursor: not a cursor this list handed out") from None
        if when.tzinfo is None:
            raise ApiError(422, "bad_cursor", "cursor: not a cursor this list handed out")
        q = q.where(or_(Verification.created_at < when, and_(Verification.created_at == when, Verification.id < i)))
    rows = session.execute(q.order_by(Verification.created_at.desc(), Verification.id.desc()).limit(limit + 1)).all()
    more, rows = len(rows) > limit, rows[:limit]
    items = [VerificationSummary(id=r[0], status=r[1], verdict=r[2] if r[1] == JobStatus.SUCCEEDED else None,
                                 reference_id=r[3], reference_name=r[4], reference_version=r[5], suspect_sha256=r[6],
                                 attempts=r[7], created_at=r[8], started_at=r[9], finished_at=r[10]) for r in rows]
    last = items[-1] if more and items else None
    return VerificationPage(items=items, next_cursor=paging.encode([last.created_at.isoformat(), last.id]) if last else None)


@router.get("/{job_id}", response_model=VerificationDoc, summary="A job's status and, when done, its report",
            responses={404: {"description": "no such job visible to you"}})
def get_verification(job_id: str, session: SessionDep, include: Literal["permutations"] | None = INCLUDE,
                     principal: Principal = allow(*SUBMITTERS, action="reading verifications")) -> JSONResponse:
    job = get_job(session, principal, job_id)
    headers = {} if JobStatus(job.status).finished else {"Retry-After": RETRY_AFTER}
    return JSONResponse(_out(job, include).model_dump(mode="json"), headers=headers)


@router.get("/{job_id}/audit", response_model=AuditTrail, summary="The job's audit events, hash-chained",
            responses={404: {"description": "no such job visible to you"}})
def get_audit(job_id: str, session: SessionDep, runtime: RuntimeDep,
              principal: Principal = allow(*SUBMITTERS, action="reading verifications")) -> AuditTrail:
    job = get_job(session, principal, job_id)
    events = session.scalars(select(AuditEvent).where(AuditEvent.job_id == job.id).order_by(AuditEvent.seq)).all()
    ok = audit.verify_events(session, runtime.secret, events)
    return AuditTrail(
        verification_id=job.id, verified=ok,
        events=[AuditEventOut(seq=e.seq, job_id=e.job_id, kind=e.kind, payload=e.payload, created_at=audit.iso(e.created_at),
                              prev_hash=e.prev_hash, hash=e.hash) for e in events],
    )
