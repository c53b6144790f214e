"""Signed reports (``findlady.signed-report/1``): Ed25519 over the report's canonical JSON.

An envelope reads ``{"format": "findlady.signed-report/1", "report": {...}, "signature":
{"alg": "Ed25519", "key_id": "...", "value": "<base64 of 64 bytes>"}}``; the signed bytes are
``report_format.canonical_json(report)``. Public keys are published as ``{"keys": [{"key_id",
"alg": "Ed25519", "public_key": "<base64 of the 32 raw bytes>"}]}`` (standard base64 with
padding); a key's id is the first 16 hex digits of the sha256 of its raw bytes, so anyone can
recompute it. Anyone holding the published keys can check a report copied out of the service.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from findlady_core.errors import InputError
from findlady_core.report_format import canonical_json

FORMAT = "findlady.signed-report/1"
ALG = "Ed25519"


class SignatureFormatError(InputError):
    """A signed report or a key list that does not have the documented shape."""

    code = "bad_signed_report"


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def public_entry(key: Ed25519PublicKey) -> dict[str, str]:
    """One entry of the published key list."""
    raw = raw_public(key)
    return {"key_id": key_id(raw), "alg": ALG, "public_key": base64.b64encode(raw).decode()}


def sign_report(report: Mapping[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """The signed envelope of ``report`` (which must already be plain JSON: no NaN)."""
    value = private_key.sign(canonical_json(dict(report)))
    return {
        "format": FORMAT,
        "report": dict(report),
        "signature": {"alg": ALG, "key_id": key_id(raw_public(private_key.public_key())),
                      "value": base64.b64encode(value).decode()},
    }


def _b64(text: Any, length: int, what: str) -> bytes:
    if not isinstance(text, str):
        raise SignatureFormatError(f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureFormatError(f"{what} is not valid base64") from None
    if len(raw) != length:
        raise SignatureFormatError(f"{what} must decode to {length} bytes, got {len(raw)}")
    return raw


def parse_keys(doc: Any) -> dict[str, Ed25519PublicKey]:
    """``GET /v1/signing-keys``'s body as ``{key_id: public key}``; ids are recomputed, so a
    list claiming another key's id is refused."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
        raise SignatureFormatError('a key list reads {"keys": [{"key_id", "alg", "public_key"}, ...]}')
    out = {}
    for i, entry in enumerate(doc["keys"]):
        if not isinstance(entry, Mapping) or entry.get("alg") != ALG:
            raise SignatureFormatError(f"keys[{i}]: expected an object with alg {ALG!r}")
        raw = _b64(entry.get("public_key"), 32, f"keys[{i}].public_key")
        if entry.get("key_id") != key_id(raw):
            raise SignatureFormatError(f"keys[{i}]: key_id {entry.get('key_id')!r} is not this key's id {key_id(raw)!r}")
        out[key_id(raw)] = Ed25519PublicKey.from_public_bytes(raw)
    return out


def check_envelope(envelope: Any, keys: Mapping[str, Ed25519PublicKey]) -> tuple[bool, str]:
    """``(valid, why)``: whether the envelope's signature verifies under one of ``keys``.
    A malformed envelope raises ``SignatureFormatError`` (bad input, not a bad signature)."""
    if not isinstance(envelope, Mapping) or envelope.get("format") != FORMAT:
        raise SignatureFormatError(f"not a signed report: 'format' must be {FORMAT!r}")
    report, sig = envelope.get("report"), envelope.get("signature")
    if not isinstance(report, Mapping) or not isinstance(sig, Mapping):
        raise SignatureFormatError("a signed report holds a 'report' object and a 'signature' object")
    if sig.get("alg") != ALG:
        raise SignatureFormatError(f"signature alg must be {ALG!r}, got {sig.get('alg')!r}")
    value = _b64(sig.get("value"), 64, "signature.value")
    kid = sig.get("key_id")
    public = keys.get(kid) if isinstance(kid, str) else None
    if public is None:
        return False, f"signed by key {kid!r}, which is not among the {len(keys)} given keys"
    try:
        public.verify(value, canonical_json(dict(report)))
    except InvalidSignature:
        return False, f"the signature does not match the report (key {kid})"
    return True, f"signature valid (Ed25519, key {kid})"
