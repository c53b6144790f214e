"""Request-bound dependencies of the routes: the session, the runtime, the job queue, the
caller, and role checks (``allow(...)``): a route states who may call it in its signature."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.core.security import Principal, authenticate, bearer_token, require
from app.jobs.queue import JobQueue
from app.models import Role
from app.runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_jobs(request: Request) -> JobQueue:
    return request.app.state.jobs


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.runtime.sessions() as session:
        yield session


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
JobsDep = Annotated[JobQueue, Depends(get_jobs)]
SessionDep = Annotated[Session, Depends(get_session)]


def current_principal(request: Request, session: SessionDep, runtime: RuntimeDep) -> Principal:
    """The caller behind the bearer key; 401 for a missing or unknown key."""
    token = bearer_token(request.headers.get("authorization", ""))
    return authenticate(session, token, server_secret=runtime.secret, admin_key=runtime.admin_key)


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def allow(*roles: Role, action: str) -> Any:
    """A dependency: the caller, when its role is one of ``roles``; 403 naming ``action`` otherwise.

    Use as a parameter's default: ``principal: Principal = allow(Role.OWNER, action="...")``.
    """

    def check(principal: CurrentPrincipal) -> Principal:
        require(principal, *roles, action=action)
        return principal

    return Depends(check)


SUBMITTERS = (Role.OWNER, Role.AUDITOR)  # who may submit and read verifications

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or unknown API key"},
    403: {"description": "this key's role may not do this"},
}
