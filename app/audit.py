"""The audit trail: one global append-only chain of events, each row HMAC-linked to the last.

``hash = HMAC-SHA256(secret, prev_hash + canonical_json(content))`` where ``content`` is
``{seq, job_id, kind, payload, created_at}``; canonical JSON sorts keys and has no spaces.
Writers are serialized (a transaction-scoped advisory lock on PostgreSQL; SQLite transactions
start with ``BEGIN IMMEDIATE``), so two rows never claim the same predecessor. The database
refuses UPDATE and DELETE on the table (triggers created by the migration).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from app.core.db import is_postgres
from app.models import AuditEvent, as_utc, utcnow

GENESIS = "0" * 64
AUDIT_LOCK = 0x46_4C_41_55  # "FLAU": pg_advisory_xact_lock key of audit writers


def iso(dt: datetime) -> str:
    """UTC timestamp with microseconds and a Z: the same text on every database."""
    u = as_utc(dt)
    assert u is not None
    return u.isoformat(timespec="microseconds").replace("+00:00", "Z")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def content_of(seq: int, job_id: str | None, kind: str, payload: Mapping[str, Any], created_at: datetime) -> dict[str, Any]:
    return {"seq": seq, "job_id": job_id, "kind": kind, "payload": dict(payload), "created_at": iso(created_at)}


def chain_hash(secret: bytes, prev_hash: str, content: Mapping[str, Any]) -> str:
    return hmac.new(secret, (prev_hash + canonical_json(content)).encode(), hashlib.sha256).hexdigest()


def append(session: Session, secret: bytes, kind: str, payload: Mapping[str, Any], job_id: str | None = None) -> AuditEvent:
    """Add one event to the chain inside the caller's transaction (the caller commits)."""
    if is_postgres(session):
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": AUDIT_LOCK})
    last = session.execute(select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)).first()
    seq, prev = (1, GENESIS) if last is None else (last.seq + 1, last.hash)
    now = utcnow()
    content = content_of(seq, job_id, kind, payload, now)
    event = AuditEvent(
        seq=seq, job_id=job_id, kind=kind, payload=dict(payload), created_at=now, prev_hash=prev,
        hash=chain_hash(secret, prev, content),
    )
    session.add(event)
    session.flush()
    return event


def event_hash_ok(secret: bytes, e: AuditEvent) -> bool:
    content = content_of(e.seq, e.job_id, e.kind, e.payload, e.created_at)
    return hmac.compare_digest(chain_hash(secret, e.prev_hash, content), e.hash)


def verify_events(session: Session, secret: bytes, events: Iterable[AuditEvent]) -> bool:
    """Each event's hash is right and its predecessor row (seq - 1) carries its prev_hash."""
    for e in events:
        if not event_hash_ok(secret, e):
            return False
        if e.seq == 1:
            if e.prev_hash != GENESIS:
                return False
            continue
        prev = session.get(AuditEvent, e.seq - 1)
        if prev is None or prev.hash != e.prev_hash:
            return False
    return True


@dataclass(frozen=True)
class ChainCheck:
    """The result of walking the chain: ``events`` good links before the first broken one
    (``broken_seq``, with the ``reason``), or the whole chain when it is intact."""

    intact: bool
    events: int
    head_hash: str  # hash of the last good event (the genesis when there is none)
    broken_seq: int | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        broken = None if self.intact else {"seq": self.broken_seq, "reason": self.reason}
        return {"intact": self.intact, "events": self.events, "head_hash": self.head_hash, "first_broken": broken}


def check_chain(session: Session, secret: bytes, batch: int = 1000) -> ChainCheck:
    """Walk the whole chain from the genesis in ``seq`` order and stop at the first broken link:
    a missing or extra ``seq`` (row deleted or inserted), a ``prev_hash`` that is not the previous
    row's hash, or a hash that does not match the row's content (row edited or forged)."""
    prev_hash, expected_seq, n, last_seq = GENESIS, 1, 0, 0
    while True:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.seq > last_seq).order_by(AuditEvent.seq).limit(batch)
        ).all()
        if not rows:
            return ChainCheck(True, n, prev_hash)
        for e in rows:
            reason = None
            if e.seq != expected_seq:
                reason = f"expected seq {expected_seq}, found seq {e.seq}: a row is missing"
            elif e.prev_hash != prev_hash:
                reason = f"prev_hash does not equal the hash of seq {e.seq - 1}" if e.seq > 1 else \
                    "the first event does not start from the genesis hash"
            elif not event_hash_ok(secret, e):
                reason = "hash does not match the row's content: the row was edited or forged"
            if reason is not None:
                return ChainCheck(False, n, prev_hash, e.seq, reason)
            prev_hash, expected_seq, n, last_seq = e.hash, e.seq + 1, n + 1, e.seq


def verify_chain(session: Session, secret: bytes, batch: int = 1000) -> tuple[bool, int]:
    """Walk the whole chain from the genesis; returns ``(intact, number of good events)``."""
    c = check_chain(session, secret, batch)
    return c.intact, c.events
