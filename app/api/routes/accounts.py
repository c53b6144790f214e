"""Accounts: the admin creates owners and auditors; the key is shown once."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import JSONResponse

from app import audit
from app.api.deps import ERRORS, CurrentPrincipal, RuntimeDep, SessionDep, allow
from app.core.security import Principal, new_api_key
from app.models import Account, Role, utcnow
from app.schemas import AccountCreate, AccountCreated, AccountOut

router = APIRouter(prefix="/v1/accounts", tags=["accounts"], responses=ERRORS)


@router.post("", status_code=201, response_model=AccountCreated, summary="Create an owner or auditor (admin)")
def create_account(body: AccountCreate, session: SessionDep, runtime: RuntimeDep,
                   _: Principal = allow(Role.ADMIN, action="creating accounts")) -> JSONResponse:
    api_key, prefix, key_hash = new_api_key(runtime.secret)
    account = Account(name=body.name, role=body.role, key_prefix=prefix, key_hash=key_hash)
    session.add(account)
    session.flush()
    audit.append(session, runtime.secret, "account.created",
                 {"account_id": account.id, "name": account.name, "role": account.role, "key_prefix": prefix})
    session.commit()
    out = AccountCreated(id=account.id, name=account.name, role=account.role, created_at=account.created_at, api_key=api_key)
    return JSONResponse(out.model_dump(mode="json"), status_code=201, headers={"Cache-Control": "no-store"})


@router.get("/me", response_model=AccountOut, summary="Who am I")
def me(principal: CurrentPrincipal, session: SessionDep) -> AccountOut:
    if principal.account_id is None:
        return AccountOut(id="admin", name="admin", role=Role.ADMIN, created_at=utcnow())
    account = session.get(Account, principal.account_id)
    assert account is not None
    return AccountOut(id=account.id, name=account.name, role=account.role, created_at=account.created_at)
