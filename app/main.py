"""The FastAPI application: ``create_app(settings)``; ``uvicorn app.main:app`` uses the environment."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from app.api.routes import routers
from app.core.config import Settings
from app.core.db import upgrade
from app.errors import ApiError
from app.jobs.queue import make_queue
from app.jobs.sweeper import Sweeper
from app.metrics import Metrics
from app.middleware import BodyLimit, RequestMetrics
from app.request_log import RequestLog
from app.runtime import Runtime
from app.services.prepare import Preparer

log = logging.getLogger("findlady.api")

DESCRIPTION = """\
FindLady verifies ownership and integrity of neural networks whose neurons may have been
shuffled. Owners register reference models (optionally with a white-box watermark key);
owners and auditors submit suspects and poll for the report (`findlady.report/2`, JSON Schema at
`/v1/schemas/report`; signed with Ed25519 at `/v1/verifications/{id}/report`, keys at `/v1/signing-keys`).

Authenticate with `Authorization: Bearer <key>`. Errors read `{"detail": {"code", "message"}}`.
"""

DB_RETRY_AFTER = "5"  # seconds a client waits after a 503 for an unavailable database

_HTTP_CODES = {400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}


def create_app(settings: Settings | None = None, *, migrate: bool = True, workers: bool = True) -> FastAPI:
    """Build the API. On startup: migrate the schema, start the job queue (Celery publisher or
    in-process worker threads) and the sweeper; on shutdown stop them."""
    settings = settings or Settings()
    runtime = Runtime.from_settings(settings)
    metrics = Metrics(runtime)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if migrate:
            await run_in_threadpool(upgrade, settings.db_url)
        jobs = make_queue(runtime)
        app.state.jobs = jobs
        sweeper = Sweeper(runtime, jobs)
        preparer = Preparer(runtime)
        if workers:
            await run_in_threadpool(jobs.start)
            sweeper.start()
            await run_in_threadpool(preparer.start)
            app.state.preparer = preparer
        try:
            yield
        finally:
            if workers:
                preparer.stop()
                sweeper.stop()
                await run_in_threadpool(jobs.stop)
            runtime.close()

    app = FastAPI(title="FindLady", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.state.settings = settings

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.detail, dict):
            body = exc.detail
        else:
            body = {"code": _HTTP_CODES.get(exc.status_code, "error"), "message": str(exc.detail)}
        return JSONResponse({"detail": body}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request"
        safe = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors]
        return JSONResponse({"detail": {"code": "invalid_request", "message": message, "errors": safe}}, status_code=422)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(PoolTimeout)
    async def _database_down(_: Request, exc: Exception) -> JSONResponse:
        # The database is unreachable, restarting or locked: a temporary condition, not a bug.
        # The transaction was rolled back; the message names no host, user or SQL.
        log.warning("database unavailable: %s", type(getattr(exc, "orig", None) or exc).__name__)
        return JSONResponse({"detail": {"code": "database_unavailable",
                                        "message": "the database is unavailable; retry shortly"}},
                            status_code=503, headers={"Retry-After": DB_RETRY_AFTER})

    # Routers carry their full paths (no include prefix) so route templates label metrics.
    for r in routers():
        app.include_router(r)

    # Outermost first: metrics see the 413s the body limit produces.
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(RequestLog)  # outermost: its request id is on every line of the request
    return app


def __getattr__(name: str) -> object:
    """``uvicorn app.main:app`` builds the app from the environment on first access."""
    if name == "app":
        return create_app()
    raise AttributeError(name)
