"""The whole audit chain, checked by the server (admin): the first broken link, if any."""

from __future__ import annotations

from fastapi import APIRouter

from app import audit
from app.api.deps import ERRORS, RuntimeDep, SessionDep, allow
from app.core.security import Principal
from app.models import Role
from app.schemas import ChainReport

router = APIRouter(prefix="/v1/audit", tags=["audit"], responses=ERRORS)


@router.get("/verify", response_model=ChainReport, summary="Walk the audit hash chain (admin)")
def verify_chain(session: SessionDep, runtime: RuntimeDep,
                 _: Principal = allow(Role.ADMIN, action="verifying the audit chain")) -> ChainReport:
    """Re-check every event's HMAC and its link to the previous event, from the genesis on.
    200 either way: ``intact`` says whether the chain holds, ``first_broken`` where it breaks."""
    check = audit.check_chain(session, runtime.secret)
    session.rollback()  # read-only; end the transaction (SQLite holds its lock until then)
    return ChainReport.model_validate(check.as_dict())
