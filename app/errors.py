"""The service's error type: an HTTP status with a stable code and a human message.

Every error body reads ``{"detail": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"detail": {"code": self.code, "message": self.message}}
