"""Pure ASGI middlewares: a request body cap (413) and request metrics."""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import Metrics


class _TooLarge(Exception):
    pass


def _json_response(status: int, body: dict[str, Any]) -> list[Message]:
    data = json.dumps(body).encode()
    return [
        {"type": "http.response.start", "status": status,
         "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                     (b"connection", b"close")]},
        {"type": "http.response.body", "body": data},
    ]


class BodyLimit:
    """Answer 413 as soon as a request body is known to exceed ``max_bytes``.

    A declared ``Content-Length`` above the cap is refused before any of the body is read;
    otherwise bytes are counted as they arrive and the request is cut off at the cap, whatever
    the inner application was doing with them (its own response is replaced by the 413).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _body(self) -> dict[str, Any]:
        return {"detail": {"code": "too_large", "message": f"request body exceeds the limit of {self.max_bytes} bytes"}}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    for m in _json_response(413, self._body()):
                        await send(m)
                    return
        seen = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True
                    raise _TooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the inner app's answer to the cut-off body is replaced below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            pass
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            for m in _json_response(413, self._body()):
                await send(m)


class RequestMetrics:
    """Count requests and time them, labelled by route template (not raw path: bounded labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "<unmatched>"
            self.metrics.observe_request(scope.get("method", ""), path, status, time.perf_counter() - t0)
