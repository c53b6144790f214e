"""Request ids and the reason of every refusal (4xx), logged at INFO.

A pure ASGI middleware, outermost: it takes the client's ``X-Request-ID`` when it is a short
token (else makes one), puts it in ``app.logs.request_context`` for every log line of the
request (uvicorn's access line included: it is written while the response starts, inside this
call), returns it as ``X-Request-ID``, and for a 4xx answer reads the error body
(``{"detail": {"code", "message"}}``, small) to log why the request was refused.
"""

from __future__ import annotations

import json
import logging
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import request_context

log = logging.getLogger("findlady.api")
_TOKEN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_ERROR_BODY = 64 * 1024  # an error body larger than this is not ours; its reason is not parsed


def _reason(body: bytes) -> tuple[str, str]:
    try:
        detail = json.loads(body)["detail"]
        return str(detail.get("code", "error")), str(detail.get("message", ""))[:500]
    except (ValueError, KeyError, TypeError, AttributeError):
        return "error", ""


class RequestLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _TOKEN.match(given) else uuid.uuid4().hex
        token = request_context.set(request_id)
        status = 0
        body = bytearray()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            elif message["type"] == "http.response.body" and 400 <= status < 500 and len(body) < MAX_ERROR_BODY:
                body.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
            if 400 <= status < 500:
                code, message = _reason(bytes(body))
                log.info("refused %s %s: %d %s: %s", scope.get("method"), scope.get("path"), status, code, message)
        finally:
            request_context.reset(token)
