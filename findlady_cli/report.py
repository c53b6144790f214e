"""``findlady report verify``: check a signed report copied out of the service.

    findlady report verify FILE (--keys KEYS.json | --keys-url URL) [--json]

KEYS.json is the body of ``GET /v1/signing-keys``; ``--keys-url`` fetches it (e.g.
``http://host:8000/v1/signing-keys``). Exit 0: the signature verifies; 1: it does not (a byte
of the report changed, or the key is not among those given); 2: bad input (unreadable file,
not a signed report, a key list of the wrong shape, a URL that does not answer).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from findlady_cli.common import emit_json


def register(sub: argparse._SubParsersAction, add: Callable[..., argparse.ArgumentParser]) -> None:
    from findlady_cli.main import group

    rep = group(sub, "report", "check a signed report", "Signed reports (findlady.signed-report/1).")
    add(rep, "verify", "check a signed report's Ed25519 signature against published keys",
        "Verify FILE (GET /v1/verifications/{id}/report) against the service's public keys.\n"
        "Exit 0 valid, 1 the signature does not verify, 2 bad input.", cmd_verify, _options)


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="signed report (JSON)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--keys", metavar="KEYS.json", help="the body of GET /v1/signing-keys, saved to a file")
    src.add_argument("--keys-url", metavar="URL", help="fetch the keys, e.g. http://host:8000/v1/signing-keys")


def _read_json(path: str, what: str) -> Any:
    from findlady_core.errors import InputError

    try:
        return json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{what} {path!r} is not JSON: {e}") from None


def fetch_keys(url: str) -> Any:
    import httpx

    from findlady_core.errors import InputError

    try:
        r = httpx.get(url, timeout=30, follow_redirects=True)
        r.raise_for_status()
        return r.json()
    except (httpx.HTTPError, ValueError) as e:
        raise InputError(f"could not fetch signing keys from {url}: {e}") from None


def cmd_verify(args: argparse.Namespace) -> int:
    from findlady_core.signing import check_envelope, parse_keys

    envelope = _read_json(args.file, "signed report")
    keys = parse_keys(_read_json(args.keys, "key list") if args.keys else fetch_keys(args.keys_url))
    valid, why = check_envelope(envelope, keys)
    if args.json:
        emit_json({"valid": valid, "message": why, "key_id": envelope["signature"].get("key_id"),
                   "verdict": envelope["report"].get("verdict")})
    else:
        print(f"{'OK' if valid else 'INVALID'}: {why}")
        if valid:
            print(f"verdict: {envelope['report'].get('verdict')}")
    return 0 if valid else 1
