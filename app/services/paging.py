"""Keyset pagination: a cursor is the sort key of the last item served, opaque to clients.

Cursors are base64url JSON (``[key, ...]``); one that does not decode to the expected shape is
a 422, never a 500. Keyset (not offset) pages stay correct while rows are added.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from app.errors import ApiError

MAX_LIMIT = 200
DEFAULT_LIMIT = 50
LIMIT_DOC = f"items per page, 1 to {MAX_LIMIT}; follow next_cursor for more"


def encode(key: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(key, separators=(",", ":")).encode()).decode().rstrip("=")


def decode(cursor: str, types: tuple[type, ...]) -> list[Any]:
    """The key a cursor holds, checked against ``types`` (one per element)."""
    try:
        key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        key = None
    if (not isinstance(key, list) or len(key) != len(types)
            or not all(isinstance(v, t) and not isinstance(v, bool) for v, t in zip(key, types, strict=True))):
        raise ApiError(422, "bad_cursor", "cursor: not a cursor this list handed out (use next_cursor as given)")
    return key
