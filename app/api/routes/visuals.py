"""A finished job's pictures for the dashboard: ``GET /v1/verifications/{id}/visuals[?group=]``.

The stored document (``findlady_core.visuals``) holds every group's similarity matrices; one
answer carries the group list, the margin histograms, integrity counts and watermark bits, plus
ONE group's matrices (at most 256 x 256 each), so a response stays bounded whatever the model.
Same visibility as the job itself.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from app.api.deps import ERRORS, SUBMITTERS, SessionDep, allow
from app.core.security import Principal
from app.errors import ApiError
from app.models import JobStatus
from app.services.access import get_job

router = APIRouter(prefix="/v1/verifications", tags=["verifications"], responses=ERRORS)
RETRY_AFTER = "2"
NAMED = 20  # group names listed in an unknown-group message


@router.get("/{job_id}/visuals", summary="A finished job's pictures: similarity before/after, margins, integrity, bits",
            responses={404: {"description": "no such job visible to you, or it has no pictures"},
                       409: {"description": "the job has not succeeded (yet)"},
                       422: {"description": "no group of that name has a matrix"}})
def get_visuals(job_id: str, session: SessionDep,
                group: str | None = Query(None, max_length=1024, description="the group whose matrices to send; "
                                          "default: the largest"),
                principal: Principal = allow(*SUBMITTERS, action="reading verifications")) -> dict[str, Any]:
    from findlady_core.visuals import view

    job = get_job(session, principal, job_id)
    if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
        raise ApiError(409, "not_finished", f"verification {job_id} is {job.status}; poll it until it succeeds",
                       headers={"Retry-After": RETRY_AFTER})
    if job.status != JobStatus.SUCCEEDED:
        raise ApiError(409, "job_failed", f"verification {job_id} failed: it has no pictures")
    doc = job.visuals
    if doc is None:
        raise ApiError(404, "no_visuals", f"verification {job_id} finished before pictures were stored")
    try:
        return view(doc, group)
    except KeyError:
        names = [g["name"] for g in doc.get("groups", []) if g.get("matrix")]
        more = f" (and {len(names) - NAMED} more)" if len(names) > NAMED else ""
        raise ApiError(422, "unknown_group", f"no group {group!r} with a matrix; groups: "
                       f"{', '.join(names[:NAMED])}{more}") from None
