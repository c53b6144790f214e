"""Downloads of a finished job: the signed report (submitter, reference owner) and the
re-synchronized suspect (the reference's owner only, streamed safetensors)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query
from starlette.responses import FileResponse, JSONResponse

from app.api.deps import ERRORS, SUBMITTERS, RuntimeDep, SessionDep, allow
from app.core.security import Principal
from app.core.signing import SigningKeys
from app.errors import ApiError
from app.models import JobStatus, Reference, Verification
from app.report_models import SignedReport
from app.services.access import get_job

router = APIRouter(prefix="/v1/verifications", tags=["verifications"], responses=ERRORS)
NOT_DONE = {409: {"description": "the job has not succeeded (yet)"},
            404: {"description": "no such job visible to you"}}


def _succeeded(job: Verification) -> None:
    if job.status != JobStatus.SUCCEEDED or job.report is None:
        raise ApiError(409, "not_ready", f"verification {job.id} is {job.status}: only a succeeded job has a report",
                       headers={"Retry-After": "2"} if not JobStatus(job.status).finished else None)


@router.get("/{job_id}/report", response_model=SignedReport, responses=NOT_DONE,
            summary="The report, signed with the service's Ed25519 key (keys: GET /v1/signing-keys)")
def signed_report(job_id: str, session: SessionDep, runtime: RuntimeDep,
                  include: Literal["permutations"] | None = Query(None, description="'permutations': keep them"),
                  principal: Principal = allow(*SUBMITTERS, action="reading verifications")) -> JSONResponse:
    from findlady_core.report_format import without_permutations
    from findlady_core.signing import sign_report

    job = get_job(session, principal, job_id)
    _succeeded(job)
    assert job.report is not None
    report = job.report if include == "permutations" else without_permutations(job.report)
    envelope = sign_report(report, SigningKeys(runtime.settings).current())
    return JSONResponse(envelope, headers={
        "Content-Disposition": f'attachment; filename="findlady-report-{job.id}.json"'})


@router.get("/{job_id}/resynced", summary="The suspect re-synchronized to the reference's order (reference owner)",
            response_class=FileResponse,
            responses={**NOT_DONE, 200: {"content": {"application/octet-stream": {}},
                                         "description": "safetensors, streamed"}})
def resynced_model(job_id: str, session: SessionDep, runtime: RuntimeDep,
                   principal: Principal = allow(*SUBMITTERS, action="reading verifications")) -> FileResponse:
    job = get_job(session, principal, job_id)
    ref = session.get(Reference, job.reference_id)
    if ref is None or ref.owner_id != principal.account_id:
        raise ApiError(403, "forbidden", "only the reference's owner may download the re-synchronized model")
    _succeeded(job)
    if job.resynced_sha256 is None or not runtime.blobs.exists(job.resynced_sha256):
        raise ApiError(404, "not_found", f"verification {job.id} kept no re-synchronized model")
    return FileResponse(runtime.blobs.path(job.resynced_sha256), media_type="application/octet-stream",
                        filename=f"resynced-{job.id}.safetensors")
