"""``findlady client ...``: the REST flow without hand-written multipart requests.

    findlady client register WEIGHTS --name NAME [--spec SPEC] [--key KEY]   (owner) -> reference id
    findlady client share REFERENCE_ID AUDITOR_ID                             (owner)
    findlady client submit REFERENCE_ID SUSPECT                               (owner, auditor) -> job id
    findlady client wait JOB_ID [--timeout S]                                 -> status and verdict
    findlady client report JOB_ID [-o FILE] [--resynced MODEL]                -> the signed report

The service is ``--url`` (or ``FINDLADY_URL``, default http://127.0.0.1:8000) and the key
``--api-key`` (or ``FINDLADY_API_KEY``). Exit codes as everywhere: ``wait`` exits 0 for
match / match_modified, 1 for no_match / inconclusive, 2 for a failed job; any refused request
or unreachable service is 2, with the server's reason.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from findlady_cli.common import emit_json

DEFAULT_URL = "http://127.0.0.1:8000"
POSITIVE = ("match", "match_modified")


def register(sub: argparse._SubParsersAction, add: Callable[..., argparse.ArgumentParser]) -> None:
    from findlady_cli.main import group

    c = group(sub, "client", "talk to a FindLady service (register, submit, wait, report)",
              "A client of the REST API. URL: --url or FINDLADY_URL; key: --api-key or FINDLADY_API_KEY.")
    add(c, "register", "register a reference model (owner)", "Upload weights, an optional spec and key; prints "
        "the reference id (--json: the whole body).", cmd_register, _with(_register_options))
    add(c, "share", "let an auditor list and read a reference (owner)", "Share REFERENCE_ID with AUDITOR_ID.",
        cmd_share, _with(lambda p: (p.add_argument("reference_id"), p.add_argument("auditor_id"))))
    add(c, "submit", "submit a suspect for verification", "Upload SUSPECT against REFERENCE_ID; prints the job id.",
        cmd_submit, _with(lambda p: (p.add_argument("reference_id"), p.add_argument("suspect", metavar="SUSPECT"))))
    add(c, "wait", "wait for a job to finish", "Poll JOB_ID until it succeeds or fails. Exit 0 match/match_modified, "
        "1 no_match/inconclusive, 2 failed or timed out.", cmd_wait, _with(_wait_options))
    add(c, "report", "download a job's signed report", "Write the signed report of JOB_ID (findlady.signed-report/1) "
        "to -o or stdout; check it with 'findlady report verify'.", cmd_report, _with(_report_options))


def _with(configure: Callable[[argparse.ArgumentParser], Any]) -> Callable[[argparse.ArgumentParser], None]:
    def both(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=os.environ.get("FINDLADY_URL", DEFAULT_URL),
                       help="service URL (FINDLADY_URL)")
        p.add_argument("--api-key", default=None, help="API key (default: FINDLADY_API_KEY)")
        configure(p)

    return both


def _register_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("weights", metavar="WEIGHTS", help="weight file (safetensors or torch zip)")
    p.add_argument("--name", required=True, help="model name (each upload adds a version)")
    p.add_argument("--spec", help="findlady.spec/1 JSON (inferred by the service if absent)")
    p.add_argument("--key", help="watermark key (safetensors)")


def _wait_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("job_id")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait at most")


def _report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("job_id")
    p.add_argument("-o", "--output", help="write the signed report here (default: stdout)")
    p.add_argument("--resynced", metavar="MODEL", help="also download the re-synchronized suspect (reference owner)")



def _client(args: argparse.Namespace) -> Any:
    import httpx

    from findlady_core.errors import InputError

    key = args.api_key or os.environ.get("FINDLADY_API_KEY")
    if not key:
        raise InputError("no API key: pass --api-key or set FINDLADY_API_KEY")
    return httpx.Client(base_url=args.url.rstrip("/"), headers={"Authorization": f"Bearer {key}"}, timeout=600)


def _call(http: Any, method: str, path: str, **kw: Any) -> Any:
    import httpx

    from findlady_core.errors import InputError

    try:
        r = http.request(method, path, **kw)
    except httpx.HTTPError as e:
        raise InputError(f"{method} {path}: the service did not answer: {e}") from None
    if r.status_code >= 400:
        try:
            detail = r.json()["detail"]
            why = f"{detail['code']}: {detail['message']}"
        except (ValueError, KeyError, TypeError):
            why = r.text[:500]
        raise InputError(f"{method} {path} -> {r.status_code} {why}")
    return r


def _show(args: argparse.Namespace, body: Any, line: str) -> None:
    if args.json:
        emit_json(body)
    else:
        print(line)


def cmd_register(args: argparse.Namespace) -> int:
    with _client(args) as http, ExitStack() as stack:
        files = {field: stack.enter_context(Path(path).open("rb"))
                 for field, path in (("weights", args.weights), ("spec", args.spec), ("key", args.key)) if path}
        body = _call(http, "POST", "/v1/references", data={"name": args.name}, files=files).json()
    for w in body.get("warnings") or []:
        print(f"warning: {w}", file=sys.stderr)
    _show(args, body, body["id"])
    return 0


def cmd_share(args: argparse.Namespace) -> int:
    with _client(args) as http:
        body = _call(http, "POST", f"/v1/references/{args.reference_id}/shares", json={"auditor_id": args.auditor_id}).json()
    _show(args, body, f"shared {body['reference_id']} with {body['auditor_name']} ({body['auditor_id']})")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    with _client(args) as http, Path(args.suspect).open("rb") as fh:
        body = _call(http, "POST", "/v1/verifications", data={"reference_id": args.reference_id},
                     files={"suspect": fh}).json()
    _show(args, body, body["id"])
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    from findlady_core.errors import InputError

    deadline = time.monotonic() + args.timeout
    with _client(args) as http:
        while True:
            r = _call(http, "GET", f"/v1/verifications/{args.job_id}")
            job = r.json()
            if job["status"] in ("succeeded", "failed"):
                break
            if time.monotonic() > deadline:
                raise InputError(f"job {args.job_id} still {job['status']} after {args.timeout:g} s")
            time.sleep(min(float(r.headers.get("retry-after", "1")), max(0.1, deadline - time.monotonic())))
    verdict = (job.get("report") or {}).get("verdict")
    if job["status"] == "failed":
        err = job.get("error") or {}
        _show(args, job, f"failed: {err.get('code')}: {err.get('message')}")
        return 2
    _show(args, job, f"succeeded: {verdict}")
    return 0 if verdict in POSITIVE else 1


def cmd_report(args: argparse.Namespace) -> int:
    with _client(args) as http:
        envelope = _call(http, "GET", f"/v1/verifications/{args.job_id}/report").json()
        if args.resynced:
            with http.stream("GET", f"/v1/verifications/{args.job_id}/resynced") as r:
                if r.status_code >= 400:
                    r.read()
                    _call(http, "GET", f"/v1/verifications/{args.job_id}/resynced")  # raises with the reason
                with Path(args.resynced).open("wb") as out:
                    for chunk in r.iter_bytes():
                        out.write(chunk)
    text = json.dumps(envelope, indent=1, ensure_ascii=False) + "\n"
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output} (verdict {envelope['report']['verdict']}, key {envelope['signature']['key_id']})",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
