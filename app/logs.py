"""Logging for the API and the workers: plain text (default) or one JSON object a line.

``FINDLADY_LOG_FORMAT=json`` makes every line ``{"time", "level", "logger", "message",
"job_id", "request_id"}`` (plus ``exception`` when there is one): the API's own lines, uvicorn's
access lines and the workers' (Celery's included) alike. ``job_id`` and ``request_id`` come from
context variables that the job runner and the request-id middleware set, so any log call made
while a job or a request is being handled carries them without passing them around.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

job_context: ContextVar[str | None] = ContextVar("findlady_job_id", default=None)
request_context: ContextVar[str | None] = ContextVar("findlady_request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s"
FORMATS = ("text", "json")


class ContextFilter(logging.Filter):
    """Put the current job and request ids on every record (``record.job_id``, ``request_id``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = getattr(record, "job_id", None) or job_context.get()
        record.request_id = getattr(record, "request_id", None) or request_context.get()
        parts = [f"{k}={v}" for k, v in (("job", record.job_id), ("request", record.request_id)) if v]
        record.context = f" [{' '.join(parts)}]" if parts else ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "job_id": getattr(record, "job_id", None),
            "request_id": getattr(record, "request_id", None),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def log_format() -> str:
    value = os.environ.get("FINDLADY_LOG_FORMAT", "text").strip().lower() or "text"
    if value not in FORMATS:
        raise ValueError(f"FINDLADY_LOG_FORMAT must be one of {', '.join(FORMATS)}, got {value!r}")
    return value


def configure(level: str | int = "INFO", fmt: str | None = None) -> None:
    """One stderr handler on the root logger in the chosen format; uvicorn's and Celery's
    loggers hand their records to it (their own handlers removed)."""
    fmt = fmt or log_format()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings become log lines too (one format on stderr)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.worker", "celery.app.trace"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
