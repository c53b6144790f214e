"""Verification jobs: submit a suspect against a reference, poll the job, read its audit trail.

A job is visible to its submitter and to the reference's owner; to anyone else it does not
exist (404).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

from app import audit
from app.api.deps import ERRORS, SUBMITTERS, JobsDep, RuntimeDep, SessionDep, allow
from app.core.security import Principal
from app.errors import ApiError
from app.jobs.queue import mark_enqueued
from app.models import AuditEvent, JobStatus, Verification
from app.schemas import AuditEventOut, AuditTrail, VerificationList, VerificationOut
from app.services.access import get_job, visible_jobs
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
                    "required": ["reference_id", "suspect"],
                    "properties": {
                        "reference_id": {"type": "string", "format": "uuid"},
                        "suspect": {"type": "string", "format": "binary", "description": "safetensors or torch.save zip"},
                    },
                }
            }
        },
    }
}


def _out(job: Verification) -> VerificationOut:
    return VerificationOut(
        id=job.id, status=job.status, reference_id=job.reference_id, suspect_sha256=job.suspect_sha256,
        attempts=job.attempts, created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        report=job.report, error=job.error,
        progress=job.progress if job.status == JobStatus.RUNNING else None,
    )


@router.post("", status_code=202, response_model=VerificationOut, openapi_extra=SUBMIT_SCHEMA,
             summary="Submit a suspect model for verification (owner, auditor)",
             responses={404: {"description": "no such reference visible to you"},
                        413: {"description": "upload too large"},
                        422: {"description": "bad weights, or shapes differ from the reference"}})
async def submit(request: Request, runtime: RuntimeDep, jobs: JobsDep,
                 principal: Principal = allow(*SUBMITTERS, action="submitting verifications")) -> JSONResponse:
    form = await read_multipart(request, files={"suspect"}, texts={"reference_id"}, store=runtime.blobs,
                                max_bytes=runtime.settings.max_upload_bytes)
    try:
        if "reference_id" not in form.texts:
            raise ApiError(422, "missing_field", "form field 'reference_id' is required")
        if "suspect" not in form.files:
            raise ApiError(422, "missing_field", "form field 'suspect' (the suspect's weight file) is required")
        job = await run_in_threadpool(submit_verification, runtime, principal, form.texts["reference_id"], form.files["suspect"])
    finally:
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


@router.get("", response_model=VerificationList, summary="Jobs I submitted or that ran against my references")
def list_verifications(session: SessionDep, status: str | None = None, reference_id: str | None = None,
                       limit: int = 100,
                       principal: Principal = allow(*SUBMITTERS, action="listing verifications")) -> VerificationList:
    q = select(Verification).where(visible_jobs(principal))
    if status is not None:
        q = q.where(Verification.status == status)
    if reference_id is not None:
        q = q.where(Verification.reference_id == reference_id)
    jobs = session.scalars(q.order_by(Verification.created_at.desc()).limit(max(1, min(limit, 1000)))).all()
    return VerificationList(items=[_out(j) for j in jobs])


@router.get("/{job_id}", response_model=VerificationOut, summary="A job's status and, when done, its report",
            responses={404: {"description": "no such job visible to you"}})
def get_verification(job_id: str, session: SessionDep,
                     principal: Principal = allow(*SUBMITTERS, action="reading verifications")) -> JSONResponse:
    job = get_job(session, principal, job_id)
    headers = {} if JobStatus(job.status).finished else {"Retry-After": RETRY_AFTER}
    return JSONResponse(_out(job).model_dump(mode="json"), headers=headers)


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
