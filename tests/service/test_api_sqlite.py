"""The embedded default end to end over HTTP: accounts, references, a verification job, its
report and its audit trail; access control between tenants and roles."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DatabaseError

from app import audit
from report_schema import assert_valid

from .helpers import KEY_BITS, Files, auth


def recompute(secret: bytes, event: dict) -> str:
    """The audit hash, recomputed from the API's output alone (the documented algorithm)."""
    content = {k: event[k] for k in ("seq", "job_id", "kind", "payload", "created_at")}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hmac.new(secret, (event["prev_hash"] + canonical).encode(), hashlib.sha256).hexdigest()


def test_register_submit_poll_report_audit(embedded, files: Files) -> None:
    app, api = embedded
    owner, auditor = api.account("owner"), api.account("auditor")
    r = api.register(owner, "tiny-mlp", weights=files.reference, spec=files.spec, key=files.key)
    assert r.status_code == 201, r.text
    ref = r.json()
    assert r.headers["location"] == f"/v1/references/{ref['id']}"
    assert ref["version"] == 1 and ref["has_key"] and ref["key_layer"] == "fc2.weight"
    assert ref["sha256"] == hashlib.sha256(files.reference.read_bytes()).hexdigest()
    assert ref["spec_source"] == "uploaded" and ref["groups"] == 2
    assert "weights" not in ref and "key" not in ref  # never returned

    r = api.submit(auditor, ref["id"], files.suspect)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/verifications/{job['id']}"
    assert int(r.headers["retry-after"]) > 0
    assert job["status"] in ("queued", "running", "succeeded")

    done = api.wait(auditor, job["id"])
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1 and done["error"] is None
    assert done["started_at"] and done["finished_at"]
    report = done["report"]
    assert report["format"] == "findlady.report/2"
    assert_valid(report)
    assert all("permutation" not in g for g in report["resync"]["groups"])  # REST leaves them out by default
    assert report["verdict"] in ("match", "match_modified"), report["reasons"]
    assert report["reference"]["id"] == ref["id"] and report["reference"]["sha256"] == ref["sha256"]
    assert report["suspect"]["sha256"] == hashlib.sha256(files.suspect.read_bytes()).hexdigest()
    # The worker put every neuron back: recovered permutations equal the attack's truth,
    # and the watermark, scrambled by fc1's permutation, reads perfectly again.
    full = api.http.get(f"/v1/verifications/{job['id']}", params={"include": "permutations"}, headers=auth(auditor)).json()
    recovered = {g["name"]: g["permutation"] for g in full["report"]["resync"]["groups"]}
    assert recovered == files.truth
    wm = report["watermark"]
    assert wm["bits"] == KEY_BITS and wm["bit_errors"] == 0 and wm["detected"] is True
    assert wm["bit_errors_before_resync"] > 5

    # The reference owner sees the job too; the audit trail links and verifies.
    assert api.http.get(f"/v1/verifications/{job['id']}", headers=auth(owner)).json()["report"] == report
    trail = api.http.get(f"/v1/verifications/{job['id']}/audit", headers=auth(owner)).json()
    kinds = [e["kind"] for e in trail["events"]]
    assert kinds == ["verification.submitted", "verification.started", "verification.succeeded"]
    assert trail["verified"] is True
    secret = app.state.runtime.secret
    for e in trail["events"]:
        assert recompute(secret, e) == e["hash"]
    done_event = trail["events"][-1]
    canonical = json.dumps(full["report"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)  # as stored
    assert done_event["payload"]["report_sha256"] == hashlib.sha256(canonical.encode()).hexdigest()
    with app.state.runtime.sessions() as s:
        intact, n = audit.verify_chain(s, secret)
    assert intact and n >= 3


def test_unrelated_model_is_no_match(embedded, files: Files) -> None:
    _, api = embedded
    owner = api.account("owner")
    ref = api.register(owner, "tiny-mlp", weights=files.reference, spec=files.spec, key=files.key).json()
    job = api.submit(owner, ref["id"], files.unrelated).json()
    done = api.wait(owner, job["id"])
    assert done["status"] == "succeeded", done
    assert done["report"]["verdict"] == "no_match", done["report"]["reasons"]
    assert done["report"]["watermark"]["detected"] is False


def test_versions_listing_and_inferred_spec(embedded, files: Files) -> None:
    _, api = embedded
    owner, other = api.account("owner"), api.account("owner")
    first = api.register(owner, "versioned", weights=files.reference, spec=files.spec).json()
    # No spec: the only one at hand is a plain-chain guess, stored only when the owner allows it.
    refused = api.register(owner, "versioned", weights=files.reference)
    assert refused.status_code == 422 and refused.json()["detail"]["code"] == "guess_refused"
    second = api.register(owner, "versioned", {"allow_guess": "true"}, weights=files.reference).json()
    assert (first["version"], second["version"]) == (1, 2)
    assert second["spec_source"] == "inferred" and second["warnings"]
    assert second["sha256"] == first["sha256"]  # one blob, deduplicated
    listed = api.http.get("/v1/references", params={"name": "versioned"}, headers=auth(owner)).json()["items"]
    assert [x["version"] for x in listed] == [1, 2]
    assert api.http.get("/v1/references", headers=auth(other)).json()["items"] == []
    got = api.http.get(f"/v1/references/{first['id']}", headers=auth(owner))
    assert got.status_code == 200 and got.json()["spec"]["format"] == "findlady.spec/1"
    assert api.http.get(f"/v1/references/{first['id']}", headers=auth(other)).status_code == 404


def test_access_control(embedded, files: Files) -> None:
    _, api = embedded
    alice, bob, auditor = api.account("owner"), api.account("owner"), api.account("auditor")
    ref = api.register(alice, "alice-model", weights=files.reference, spec=files.spec).json()
    job = api.submit(auditor, ref["id"], files.suspect).json()

    def status(method: str, path: str, key: str | None, **kw) -> int:
        headers = auth(key) if key else {}
        return api.http.request(method, path, headers=headers, **kw).status_code

    # 401: no key, a malformed key, a well-formed unknown key
    assert status("GET", "/v1/references", None) == 401
    assert status("GET", "/v1/references", "garbage") == 401
    assert status("GET", "/v1/references", "fl_000000000000_" + "x" * 43) == 401
    assert status("GET", "/v1/references", alice[:-2] + "zz") == 401
    # 403: a role that may not do this
    assert status("POST", "/v1/accounts", alice, json={"name": "x", "role": "owner"}) == 403
    assert status("GET", f"/v1/references/{ref['id']}/shares", auditor) == 403
    assert api.register(auditor, "x", weights=files.reference).status_code == 403
    assert status("GET", "/v1/references", api.admin_key) == 403
    # 404: other tenants' objects do not exist for you
    assert status("GET", f"/v1/references/{ref['id']}", bob) == 404
    assert status("GET", f"/v1/verifications/{job['id']}", bob) == 404
    assert status("GET", f"/v1/verifications/{job['id']}/audit", bob) == 404
    assert status("GET", f"/v1/verifications/{job['id']}", api.account("auditor")) == 404
    # an auditor lists and reads only references shared with it: none here
    assert api.http.get("/v1/references", headers=auth(auditor)).json()["items"] == []
    assert status("GET", f"/v1/references/{ref['id']}", auditor) == 404
    # the submitter and the reference owner see the job
    assert status("GET", f"/v1/verifications/{job['id']}", auditor) == 200
    assert status("GET", f"/v1/verifications/{job['id']}", alice) == 200
    mine = api.http.get("/v1/verifications", headers=auth(alice)).json()["items"]
    assert job["id"] in {j["id"] for j in mine}
    assert api.http.get("/v1/verifications", headers=auth(bob)).json()["items"] == []
    api.wait(auditor, job["id"])


def test_admin_creates_accounts_and_keys_are_hashed(embedded) -> None:
    app, api = embedded
    r = api.http.post("/v1/accounts", json={"name": "carol", "role": "auditor"}, headers=auth(api.admin_key))
    assert r.status_code == 201 and r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["api_key"].startswith("fl_") and body["role"] == "auditor"
    me = api.http.get("/v1/accounts/me", headers=auth(body["api_key"])).json()
    assert me == {"id": body["id"], "name": "carol", "role": "auditor", "created_at": body["created_at"]}
    with app.state.runtime.engine.connect() as c:
        stored = c.execute(text("SELECT key_prefix, key_hash FROM accounts WHERE id = :i"), {"i": body["id"]}).one()
    assert body["api_key"] not in stored.key_hash and len(stored.key_hash) == 64
    assert api.http.post("/v1/accounts", json={"name": "x", "role": "admin"}, headers=auth(api.admin_key)).status_code == 422
    r = api.http.post("/v1/accounts", json={"name": "x"}, headers=auth(api.admin_key))
    assert r.status_code == 422 and r.json()["detail"]["code"] == "invalid_request"


def test_audit_table_refuses_update_and_delete(embedded) -> None:
    app, api = embedded
    api.account("owner")  # at least one event
    with app.state.runtime.engine.connect() as c:
        for sql in ("UPDATE audit_events SET kind = 'forged'", "DELETE FROM audit_events"):
            with pytest.raises(DatabaseError, match="append-only"):
                c.execute(text(sql))
            c.rollback()


def test_health_ready_metrics_openapi(embedded) -> None:
    _, api = embedded
    assert api.http.get("/healthz").json() == {"status": "ok"}
    ready = api.http.get("/readyz")
    # the embedded default has no broker to ask: it says so, and checks its worker threads
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "not_configured",
                                                                   "workers": "ok"}
    metrics = api.http.get("/metrics").text
    assert 'findlady_http_requests_total{method="GET",route="/healthz",status="200"}' in metrics
    assert 'findlady_jobs{status="succeeded"}' in metrics
    assert "findlady_job_duration_seconds_bucket" in metrics
    assert 'findlady_verdicts{verdict="no_match"}' in metrics
    assert 'findlady_job_phase_duration_seconds_count{phase="resync"}' in metrics
    assert "process_resident_memory_bytes" in metrics
    paths = api.http.get("/openapi.json").json()["paths"]
    for p in ("/v1/accounts", "/v1/references", "/v1/references/{reference_id}", "/v1/verifications",
              "/v1/verifications/{job_id}", "/v1/verifications/{job_id}/audit", "/healthz", "/readyz", "/metrics"):
        assert p in paths
    upload = paths["/v1/references"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(upload["properties"]) == {"name", "weights", "spec", "key", "index", "config", "archive", "num_heads",
                                         "allow_guess"}
