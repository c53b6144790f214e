"""Dependencies shared by the routes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from app.core.db import SessionDep
from app.core.security import CurrentPrincipal, Principal, require
from app.jobs import JobQueue
from app.runtime import Runtime

__all__ = ["SessionDep", "CurrentPrincipal", "Principal", "require", "RuntimeDep", "JobsDep"]


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_jobs(request: Request) -> JobQueue:
    return request.app.state.jobs


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
JobsDep = Annotated[JobQueue, Depends(get_jobs)]

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or unknown API key"},
    403: {"description": "this key's role may not do this"},
}
