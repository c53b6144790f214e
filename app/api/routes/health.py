"""Liveness, readiness (database and broker) and Prometheus metrics. No authentication."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from app.core.db import ping

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: database and broker (or in-process workers) answer (503 otherwise)")
async def readyz(request: Request) -> JSONResponse:
    runtime = request.app.state.runtime
    checks: dict[str, str] = {}
    try:
        await run_in_threadpool(ping, runtime.engine)
        checks["database"] = "ok"
    except Exception as e:
        checks["database"] = f"down: {type(e).__name__}"
    problem = await run_in_threadpool(request.app.state.jobs.ping)
    if runtime.settings.broker_url:
        checks["broker"] = "ok" if problem is None else f"down: {problem}"
    else:  # the embedded default: no broker to ask, in-process worker threads instead
        checks["broker"] = "not_configured"
        checks["workers"] = "ok" if problem is None else f"down: {problem}"
    ready = all(v in ("ok", "not_configured") for v in checks.values())
    return JSONResponse({"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    body = await run_in_threadpool(request.app.state.metrics.render)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
