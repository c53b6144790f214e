"""Request and response bodies (pydantic v2). Tables are in ``app.models``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field

from app.models import JobStatus, Role, as_utc

# SQLite returns naive datetimes; every stored time is UTC, so say so in the output.
UTCDateTime = Annotated[datetime, AfterValidator(as_utc)]


class ErrorDetail(BaseModel):
    code: str
    message: str


class AccountCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    role: Literal[Role.OWNER, Role.AUDITOR]


class AccountOut(BaseModel):
    id: str
    name: str
    role: str
    created_at: UTCDateTime


class AccountCreated(AccountOut):
    api_key: str = Field(description="shown once; only a keyed hash is stored")


class ReferenceOut(BaseModel):
    id: str
    name: str
    version: int
    sha256: str
    size_bytes: int
    parameters: int
    groups: int = Field(description="number of permutation groups in the spec")
    spec_source: Literal["uploaded", "inferred"]
    has_key: bool
    key_layer: str | None
    status: Literal["preparing", "ready", "failed"] = Field(
        description="preparing: its null margin is being computed (verifications wait); ready; failed (see status_error)")
    status_error: ErrorDetail | None = None
    created_at: UTCDateTime


class ReferenceDetail(ReferenceOut):
    spec: dict[str, Any]


class ReferenceCreated(ReferenceDetail):
    warnings: list[str] = []


class ReferenceList(BaseModel):
    items: list[ReferenceOut]


class Progress(BaseModel):
    phase: str = Field(description="load, null, resync, integrity, watermark or write")
    done: int = Field(description="work units done in this phase (units weigh cost, so done/total tracks time)")
    total: int


class VerificationOut(BaseModel):
    id: str
    status: Literal[JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED]
    reference_id: str
    suspect_sha256: str
    attempts: int
    created_at: UTCDateTime
    started_at: UTCDateTime | None
    finished_at: UTCDateTime | None
    report: dict[str, Any] | None
    error: ErrorDetail | None
    progress: Progress | None = Field(None, description="while running: the phase and its work done / total")


class VerificationList(BaseModel):
    items: list[VerificationOut]


class AuditEventOut(BaseModel):
    seq: int
    job_id: str | None
    kind: str
    payload: dict[str, Any]
    created_at: str = Field(description="UTC, ISO 8601 with microseconds: the text that was hashed")
    prev_hash: str
    hash: str


class AuditTrail(BaseModel):
    verification_id: str
    algorithm: str = "HMAC-SHA256(secret, prev_hash + canonical_json({seq, job_id, kind, payload, created_at}))"
    verified: bool = Field(description="the server re-checked each hash and its link to the previous row")
    events: list[AuditEventOut]


class BrokenLink(BaseModel):
    seq: int
    reason: str


class ChainReport(BaseModel):
    intact: bool = Field(description="every event's hash and link to its predecessor re-checked")
    events: int = Field(description="good events before the first broken link (all of them when intact)")
    head_hash: str = Field(description="hash of the last good event; anchor it elsewhere to detect truncation")
    first_broken: BrokenLink | None


# --- report format 2, light lists, sharing (the report's own models: ``app.report_models``)

from app.report_models import Report  # noqa: E402  (kept beside the bodies that embed it)

Status = Literal[JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED]


class VerificationDoc(VerificationOut):
    """``VerificationOut`` as documented: the report typed (the stored JSON is returned as is)."""

    report: Report | None  # type: ignore[assignment]


class VerificationSummary(BaseModel):
    id: str
    status: Status
    verdict: Literal["match", "match_modified", "no_match", "inconclusive"] | None = Field(
        description="the report's verdict once the job succeeded")
    reference_id: str
    reference_name: str
    reference_version: int
    suspect_sha256: str
    attempts: int
    created_at: UTCDateTime
    started_at: UTCDateTime | None
    finished_at: UTCDateTime | None


class VerificationPage(BaseModel):
    items: list[VerificationSummary]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last page")


class ReferencePage(BaseModel):
    items: list[ReferenceOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last page")


class ShareCreate(BaseModel):
    auditor_id: str = Field(min_length=1, max_length=36, description="id of an auditor account (GET /v1/accounts/me)")


class ShareOut(BaseModel):
    reference_id: str
    auditor_id: str
    auditor_name: str
    created_at: UTCDateTime


class ShareList(BaseModel):
    items: list[ShareOut]
