"""Database tables (SQLAlchemy 2). Alembic migrations create them; nothing else does."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

JSONType = JSON().with_variant(JSONB(), "postgresql")



class Role(StrEnum):
    """Who a key belongs to. The admin is not an account (its key is ``FINDLADY_ADMIN_KEY``)."""

    ADMIN = "admin"
    OWNER = "owner"
    AUDITOR = "auditor"


class ReferenceStatus(StrEnum):
    """``preparing`` while the null margin of a large reference is computed in the background
    (``app.services.prepare``); verifications against it wait for ``ready``; ``failed`` fails them."""

    PREPARING = "preparing"
    READY = "ready"
    FAILED = "failed"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED)


def new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(dt: datetime | None) -> datetime | None:
    """SQLite hands datetimes back without a zone; they are stored in UTC."""
    if dt is None:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps in UTC, zone-aware on the Python side on every database (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime: use app.models.utcnow()")
        return None if value is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return as_utc(value)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime()}


class Account(Base):
    """An owner or auditor. Only a keyed hash of its API key is stored."""

    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16))
    key_prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Reference(Base):
    """A registered reference model: weights and key live in the blob store by sha256."""

    __tablename__ = "reference_models"
    __table_args__ = (UniqueConstraint("owner_id", "name", "version", name="uq_reference_owner_name_version"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    parameters: Mapped[int] = mapped_column(BigInteger)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType)
    spec_source: Mapped[str] = mapped_column(String(16))  # uploaded | inferred
    key_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    key_layer: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    # name -> [shape, dtype] of every tensor: a suspect must match before it is queued
    shapes: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # The reference's null margin (``findlady_core.report.reference_null``), computed once at
    # registration by solver ``null_solver_version``; a job recomputes it when the solver changed.
    null_margin: Mapped[float | None] = mapped_column(Float, nullable=True)
    null_solver_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # config.json of a reference uploaded as a model folder (its blob is then a folder), else NULL
    config: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=ReferenceStatus.READY, server_default="ready")
    status_error: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)  # {code, message} when failed
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Verification(Base):
    """One verification job; its state lives here, never in the broker."""

    __tablename__ = "verifications"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    reference_id: Mapped[str] = mapped_column(ForeignKey("reference_models.id"), index=True)
    submitter_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    suspect_sha256: Mapped[str] = mapped_column(String(64))
    suspect_size_bytes: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), index=True, default=JobStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    # The dashboard's pictures (``findlady_core.visuals``), megabytes for a large model: deferred,
    # so listing jobs never loads them; only GET .../visuals reads the column.
    visuals: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True, deferred=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # the suspect re-synchronized to the reference's order (safetensors blob), written at job end
    resynced_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # {phase, done, total} while running (``findlady_core.progress``), NULL otherwise
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    # copied from the report when it is stored, so /metrics need not read reports
    verdict: Mapped[str | None] = mapped_column(String(16), nullable=True)
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)


class ReferenceShare(Base):
    """An owner lets one auditor account list and read one reference (never weights or keys)."""

    __tablename__ = "reference_shares"

    reference_id: Mapped[str] = mapped_column(ForeignKey("reference_models.id"), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), primary_key=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AuditEvent(Base):
    """One link of the global, append-only, HMAC-chained audit trail (see ``app.audit``)."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    job_id: Mapped[str | None] = mapped_column(String(36), index=True, nullable=True)
    kind: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)
