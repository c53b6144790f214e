"""Sharing a reference with named auditor accounts: they may then list and read it.

Only the reference's owner shares or unshares (another owner: 404, the reference does not exist
for it). Each change is an audit event. Shared readers see what ``GET /v1/references/{id}``
shows (name, version, sha256, spec), never weights or keys.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import audit
from app.core.security import Principal
from app.errors import ApiError
from app.models import Account, ReferenceShare, Role
from app.services.access import get_reference


def list_shares(session: Session, principal: Principal, reference_id: str) -> list[tuple[ReferenceShare, Account]]:
    ref = get_reference(session, principal, reference_id, read=True)
    rows = session.execute(
        select(ReferenceShare, Account).join(Account, Account.id == ReferenceShare.account_id)
        .where(ReferenceShare.reference_id == ref.id).order_by(ReferenceShare.created_at, Account.id)
    ).all()
    return [(s, a) for s, a in rows]


def share(session: Session, secret: bytes, principal: Principal, reference_id: str,
          auditor_id: str) -> tuple[ReferenceShare, Account, bool]:
    """Share; returns the share, the auditor and whether it is new (sharing twice is a no-op)."""
    ref = get_reference(session, principal, reference_id, read=True)
    auditor = session.get(Account, auditor_id.strip())
    if auditor is None or auditor.role != Role.AUDITOR:
        raise ApiError(422, "not_an_auditor", f"auditor_id: no auditor account {auditor_id!r}")
    existing = session.get(ReferenceShare, (ref.id, auditor.id))
    if existing is not None:
        return existing, auditor, False
    row = ReferenceShare(reference_id=ref.id, account_id=auditor.id)
    session.add(row)
    session.flush()
    audit.append(session, secret, "reference.shared", {"reference_id": ref.id, "auditor_id": auditor.id,
                                                       "owner_id": principal.account_id})
    session.commit()
    return row, auditor, True


def unshare(session: Session, secret: bytes, principal: Principal, reference_id: str, auditor_id: str) -> None:
    ref = get_reference(session, principal, reference_id, read=True)
    row = session.get(ReferenceShare, (ref.id, auditor_id))
    if row is None:
        raise ApiError(404, "not_found", f"reference {ref.id!r} is not shared with {auditor_id!r}")
    session.delete(row)
    audit.append(session, secret, "reference.unshared", {"reference_id": ref.id, "auditor_id": auditor_id,
                                                         "owner_id": principal.account_id})
    session.commit()
