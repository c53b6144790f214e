"""Tenant visibility, written once: which references and jobs a caller may see.

An owner sees its own references; an auditor may verify against any reference and list and read
those an owner shared with it. A job is
visible to its submitter and to its reference's owner. To anyone else an object does not exist:
404, never 403, so ids of other tenants leak nothing.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import or_, select, true
from sqlalchemy.orm import Session

from app.core.security import Principal
from app.errors import ApiError
from app.models import Reference, ReferenceShare, Role, Verification


def visible_references(principal: Principal) -> Any:
    """SQL condition on ``Reference``: the references this caller may see or verify against."""
    if principal.role == Role.OWNER:
        return Reference.owner_id == principal.account_id
    return true()


def readable_references(principal: Principal) -> Any:
    """SQL condition on ``Reference``: the references this caller may list and read. An owner
    reads its own; an auditor only those shared with it (it may still verify against any id)."""
    if principal.role == Role.OWNER:
        return Reference.owner_id == principal.account_id
    shared = select(ReferenceShare.reference_id).where(ReferenceShare.account_id == principal.account_id)
    return Reference.id.in_(shared)


def visible_jobs(principal: Principal) -> Any:
    """SQL condition on ``Verification``: jobs this caller submitted or that ran against one of
    its references."""
    own_refs = select(Reference.id).where(Reference.owner_id == principal.account_id)
    return or_(Verification.submitter_id == principal.account_id, Verification.reference_id.in_(own_refs))


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def get_reference(session: Session, principal: Principal, reference_id: str, *, read: bool = False) -> Reference:
    """The reference, if this caller may verify against it (``read``: list and read it); 404 otherwise."""
    ref = None
    where = readable_references(principal) if read else visible_references(principal)
    if _is_uuid(reference_id):
        ref = session.scalar(select(Reference).where(Reference.id == reference_id, where))
    if ref is None:
        raise ApiError(404, "not_found", f"no reference {reference_id!r}")
    return ref


def get_job(session: Session, principal: Principal, job_id: str) -> Verification:
    """The job, if this caller may see it; 404 otherwise."""
    job = session.scalar(select(Verification).where(Verification.id == job_id, visible_jobs(principal)))
    if job is None:
        raise ApiError(404, "not_found", f"no verification {job_id!r}")
    return job
