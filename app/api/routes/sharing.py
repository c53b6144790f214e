"""Sharing a reference with auditors (owner): ``/v1/references/{id}/shares``."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import JSONResponse, Response

from app.api.deps import ERRORS, RuntimeDep, SessionDep, allow
from app.core.security import Principal
from app.models import Role
from app.schemas import ShareCreate, ShareList, ShareOut
from app.services import sharing

router = APIRouter(prefix="/v1/references", tags=["references"], responses=ERRORS)
NOT_YOURS = {404: {"description": "no such reference among yours"}}


@router.get("/{reference_id}/shares", response_model=ShareList, responses=NOT_YOURS,
            summary="Auditors this reference is shared with (owner)")
def list_shares(reference_id: str, session: SessionDep,
                principal: Principal = allow(Role.OWNER, action="listing shares")) -> ShareList:
    return ShareList(items=[ShareOut(reference_id=s.reference_id, auditor_id=a.id, auditor_name=a.name,
                                     created_at=s.created_at)
                            for s, a in sharing.list_shares(session, principal, reference_id)])


@router.post("/{reference_id}/shares", status_code=201, response_model=ShareOut,
             responses={**NOT_YOURS, 200: {"description": "already shared", "model": ShareOut},
                        422: {"description": "no auditor account with that id"}},
             summary="Let an auditor list and read this reference (owner)")
def create_share(reference_id: str, body: ShareCreate, session: SessionDep, runtime: RuntimeDep,
                 principal: Principal = allow(Role.OWNER, action="sharing references")) -> JSONResponse:
    row, auditor, new = sharing.share(session, runtime.secret, principal, reference_id, body.auditor_id)
    out = ShareOut(reference_id=row.reference_id, auditor_id=auditor.id, auditor_name=auditor.name,
                   created_at=row.created_at)
    return JSONResponse(out.model_dump(mode="json"), status_code=201 if new else 200)


@router.delete("/{reference_id}/shares/{auditor_id}", status_code=204,
               responses={404: {"description": "no such reference among yours, or not shared with that auditor"}},
               summary="Stop sharing this reference with an auditor (owner)")
def delete_share(reference_id: str, auditor_id: str, session: SessionDep, runtime: RuntimeDep,
                 principal: Principal = allow(Role.OWNER, action="sharing references")) -> Response:
    sharing.unshare(session, runtime.secret, principal, reference_id, auditor_id)
    return Response(status_code=204)
