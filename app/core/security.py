"""API keys and the caller's identity (no web framework here: ``app.api.deps`` reads the
request and calls ``authenticate``).

A key reads ``fl_<prefix>_<secret>``. The prefix (public, unique) finds the account; the
database keeps only ``HMAC-SHA256(server secret, prefix + "." + secret)``, so a leaked table
reveals no usable key. The admin is not an account: its key is ``FINDLADY_ADMIN_KEY``,
compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.errors import ApiError
from app.models import Account, Role, as_utc, utcnow

KEY_PREFIX_BYTES = 6
LAST_USED_RESOLUTION = timedelta(minutes=1)  # write last_used_at at most this often


def hash_key(server_secret: bytes, prefix: str, secret: str) -> str:
    return hmac.new(server_secret, f"{prefix}.{secret}".encode(), hashlib.sha256).hexdigest()


def new_api_key(server_secret: bytes) -> tuple[str, str, str]:
    """A fresh key: returns ``(api_key, prefix, key_hash)``; only the last two are stored."""
    prefix = secrets.token_hex(KEY_PREFIX_BYTES)
    secret = secrets.token_urlsafe(32)
    return f"fl_{prefix}_{secret}", prefix, hash_key(server_secret, prefix, secret)


def split_key(key: str) -> tuple[str, str] | None:
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != "fl" or len(parts[1]) != 2 * KEY_PREFIX_BYTES or not parts[2]:
        return None
    return parts[1], parts[2]


def same_secret(a: str, b: str) -> bool:
    """Constant-time equality that also hides the length of ``b``."""
    return hmac.compare_digest(hashlib.sha256(a.encode()).digest(), hashlib.sha256(b.encode()).digest())


@dataclass(frozen=True)
class Principal:
    """Who is calling: the admin (no account) or an owner/auditor account."""

    role: Role
    account_id: str | None
    name: str


def bearer_token(authorization: str) -> str:
    """The key of an ``Authorization: Bearer <key>`` header value; 401 when there is none."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthenticated", "missing API key: send 'Authorization: Bearer <key>'")
    return token.strip()


def authenticate(session: Session, token: str, *, server_secret: bytes, admin_key: str) -> Principal:
    """Resolve a bearer key; 401 for an unknown key."""
    if same_secret(token, admin_key):
        return Principal(Role.ADMIN, None, "admin")
    parts = split_key(token)
    account = None
    if parts is not None:
        account = session.scalar(select(Account).where(Account.key_prefix == parts[0]))
    expected = hash_key(server_secret, *parts) if parts is not None else ""
    if account is None or not hmac.compare_digest(account.key_hash, expected):
        session.rollback()
        raise ApiError(401, "unauthenticated", "unknown API key")
    now = utcnow()
    last = as_utc(account.last_used_at)
    if last is None or now - last > LAST_USED_RESOLUTION:
        session.execute(update(Account).where(Account.id == account.id).values(last_used_at=now))
    # End the transaction now: on SQLite it holds the database lock, and uploads run long.
    session.commit()
    return Principal(Role(account.role), account.id, account.name)


def require(principal: Principal, *roles: Role, action: str) -> None:
    """403 when the caller's role may not perform ``action``."""
    if principal.role not in roles:
        allowed = " or ".join(roles)
        raise ApiError(403, "forbidden", f"{action} needs the {allowed} role; this key is {principal.role}")
