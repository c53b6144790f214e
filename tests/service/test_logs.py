"""`FINDLADY_LOG_FORMAT=json`: `findlady serve` writes one JSON object a line, its own lines,
uvicorn's access lines and the job's alike, with request and job ids; refusals say why."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from .helpers import Api, Files, auth
from .test_shutdown import serve

KEYS = {"time", "level", "logger", "message", "job_id", "request_id"}


def test_json_logs_carry_request_and_job_ids_and_the_reason_of_refusals(tmp_path: Path, files: Files) -> None:
    with serve(tmp_path, "serve.log", FINDLADY_LOG_FORMAT="json") as (proc, url, log):
        api = Api(url, (tmp_path / "admin.key").read_text().strip())
        bad = api.http.post("/v1/accounts", json={"name": "x", "role": "emperor"}, headers={
            **auth(api.admin_key), "X-Request-ID": "req-422"})
        assert bad.status_code == 422 and bad.headers["x-request-id"] == "req-422"
        assert api.http.get("/v1/accounts/me", headers={"X-Request-ID": "req-401"}).status_code == 401
        owner = api.account("owner")
        ref = api.register(owner, "m", weights=files.reference, spec=files.spec).json()
        job_id = api.submit(owner, ref["id"], files.suspect).json()["id"]
        assert api.wait(owner, job_id)["status"] == "succeeded"
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    docs = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(KEYS <= set(d) <= KEYS | {"exception"} for d in docs)
    assert all(d["time"].endswith("+00:00") and d["level"] in ("DEBUG", "INFO", "WARNING", "ERROR") for d in docs)

    by_request = {}
    for d in docs:
        by_request.setdefault(d["request_id"], []).append(d)
    refused = [d for d in by_request["req-422"] if d["logger"] == "findlady.api"]
    assert refused and refused[0]["level"] == "INFO" and "422 invalid_request" in refused[0]["message"]
    assert "role" in refused[0]["message"]  # the reason, not just the status
    assert any(d["logger"] == "uvicorn.access" and '"POST /v1/accounts HTTP/1.1" 422' in d["message"]
               for d in by_request["req-422"])
    assert any("401 unauthenticated" in d["message"] for d in by_request["req-401"])
    job_lines = [d["message"] for d in docs if d["job_id"] == job_id]
    assert f"job {job_id}: attempt 1 started" in job_lines and any("succeeded" in m for m in job_lines)
    assert any("the admin key was generated" in d["message"] for d in docs)


def test_metrics_name_the_cores_verdicts_and_phases() -> None:
    """/metrics writes the verdicts and phases out (the API must not import torch to scrape)."""
    from app import metrics
    from findlady_core.progress import PHASES
    from findlady_core.report import VERDICTS

    assert metrics.VERDICTS == VERDICTS and metrics.PHASES == PHASES
