"""Every route x every role, table-driven; and no secret in any response or log line.

Roles: the admin, the owner of the reference under test, another owner, the auditor who
submitted the job under test, another auditor, no key, a bad key. A caller never sees another
tenant's objects (404, not 403); a role that may not act gets 403; a missing or unknown key 401.
"""

from __future__ import annotations

import base64
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from safetensors.torch import load_file

from .helpers import Api, Files, auth

ROLES = ("admin", "owner", "other_owner", "auditor", "other_auditor", "no_key", "bad_key")
BAD_KEY = "fl_0123456789ab_" + "x" * 43  # well formed, unknown


@dataclass
class World:
    api: Api
    keys: dict[str, str | None]
    ref: str  # the owner's reference, shared with the auditor (not with the other auditor)
    job: str  # the auditor's job against it, finished
    spare: str  # an auditor account that shares are added to and removed from
    files: Files
    seen: list[httpx.Response] = field(default_factory=list)

    def call(self, role: str, method: str, path: str, **kw: Any) -> httpx.Response:
        key = self.keys[role]
        r = self.api.http.request(method, path.format(ref=self.ref, job=self.job, missing=uuid.uuid4(), spare=self.spare),
                                  headers=auth(key) if key else {}, **kw)
        self.seen.append(r)
        return r


@pytest.fixture(scope="module")
def world(embedded, files: Files) -> World:  # type: ignore[no-untyped-def]
    _, api = embedded
    keys: dict[str, str | None] = {
        "admin": api.admin_key, "owner": api.account("owner"), "other_owner": api.account("owner"),
        "auditor": api.account("auditor"), "other_auditor": api.account("auditor"), "no_key": None, "bad_key": BAD_KEY,
    }
    ref = api.register(keys["owner"], "matrix", weights=files.reference, spec=files.spec, key=files.key)
    assert ref.status_code == 201, ref.text
    ref_id = ref.json()["id"]
    ids = {role: api.http.get("/v1/accounts/me", headers=auth(keys[role])).json()["id"]  # type: ignore[arg-type]
           for role in ("auditor", "other_auditor")}
    spare = api.http.get("/v1/accounts/me", headers=auth(api.account("auditor"))).json()["id"]
    shared = api.http.post(f"/v1/references/{ref_id}/shares", json={"auditor_id": ids["auditor"]},
                           headers=auth(keys["owner"]))  # type: ignore[arg-type]
    assert shared.status_code == 201, shared.text
    job = api.submit(keys["auditor"], ref_id, files.suspect)  # type: ignore[arg-type]
    assert job.status_code == 202, job.text
    assert api.wait(keys["auditor"], job.json()["id"])["status"] == "succeeded"  # type: ignore[arg-type]
    return World(api, keys, ref_id, job.json()["id"], spare, files)


def _register(w: World, role: str) -> httpx.Response:
    with w.files.reference.open("rb") as fw, w.files.spec.open("rb") as fs:
        return w.call(role, "POST", "/v1/references", data={"name": f"m-{role}"},
                      files={"weights": fw, "spec": fs})


def _submit(w: World, role: str) -> httpx.Response:
    with w.files.suspect.open("rb") as fh:
        return w.call(role, "POST", "/v1/verifications", data={"reference_id": w.ref}, files={"suspect": fh})


def _share(w: World, role: str) -> httpx.Response:
    return w.call(role, "POST", "/v1/references/{ref}/shares", json={"auditor_id": w.spare})


def _unshare(w: World, role: str) -> httpx.Response:
    # Share first (as the owner, unchecked), so the owner's DELETE has something to remove.
    w.api.http.post(f"/v1/references/{w.ref}/shares", json={"auditor_id": w.spare}, headers=auth(w.keys["owner"] or ""))
    return w.call(role, "DELETE", "/v1/references/{ref}/shares/{spare}")


def _visuals(w: World, role: str) -> httpx.Response:
    w.api.wait(w.keys["auditor"], w.job)  # type: ignore[arg-type]  # pictures exist once the job succeeded
    return w.call(role, "GET", "/v1/verifications/{job}/visuals")


Route = Callable[[World, str], httpx.Response]


def get(path: str) -> Route:
    return lambda w, role: w.call(role, "GET", path)


ANON = {"no_key": 401, "bad_key": 401}
EVERYONE = dict.fromkeys(ROLES, 200)

# route name -> (call, expected status per role)
MATRIX: dict[str, tuple[Route, dict[str, int]]] = {
    "POST /v1/accounts": (
        lambda w, role: w.call(role, "POST", "/v1/accounts", json={"name": "n", "role": "auditor"}),
        {"admin": 201, "owner": 403, "other_owner": 403, "auditor": 403, "other_auditor": 403, **ANON}),
    "GET /v1/accounts/me": (get("/v1/accounts/me"),
                            {"admin": 200, "owner": 200, "other_owner": 200, "auditor": 200, "other_auditor": 200, **ANON}),
    "POST /v1/references": (_register,
                            {"admin": 403, "owner": 201, "other_owner": 201, "auditor": 403, "other_auditor": 403, **ANON}),
    # Auditors list and read what was shared with them (the other auditor: nothing, so 404).
    "GET /v1/references": (get("/v1/references"),
                           {"admin": 403, "owner": 200, "other_owner": 200, "auditor": 200, "other_auditor": 200, **ANON}),
    "GET /v1/references/{id}": (get("/v1/references/{ref}"),
                                {"admin": 403, "owner": 200, "other_owner": 404, "auditor": 200, "other_auditor": 404,
                                 **ANON}),
    "GET /v1/references/{unknown-id}": (get("/v1/references/{missing}"),
                                        {"admin": 403, "owner": 404, "other_owner": 404, "auditor": 404,
                                         "other_auditor": 404, **ANON}),
    "GET /v1/references/{id}/shares": (get("/v1/references/{ref}/shares"),
                                       {"admin": 403, "owner": 200, "other_owner": 404, "auditor": 403,
                                        "other_auditor": 403, **ANON}),
    "POST /v1/references/{id}/shares": (_share,  # 201 the first time, 200 when already shared
                                        {"admin": 403, "owner": 200, "other_owner": 404, "auditor": 403,
                                         "other_auditor": 403, **ANON}),
    "DELETE /v1/references/{id}/shares/{auditor_id}": (_unshare,
                                                       {"admin": 403, "owner": 204, "other_owner": 404, "auditor": 403,
                                                        "other_auditor": 403, **ANON}),
    # An auditor may verify against any reference id it was given; another owner may not.
    "POST /v1/verifications": (_submit,
                               {"admin": 403, "owner": 202, "other_owner": 404, "auditor": 202, "other_auditor": 202,
                                **ANON}),
    "GET /v1/verifications": (get("/v1/verifications"),
                              {"admin": 403, "owner": 200, "other_owner": 200, "auditor": 200, "other_auditor": 200,
                               **ANON}),
    "GET /v1/verifications/{id}": (get("/v1/verifications/{job}"),
                                   {"admin": 403, "owner": 200, "other_owner": 404, "auditor": 200, "other_auditor": 404,
                                    **ANON}),
    "GET /v1/verifications/{id}/audit": (get("/v1/verifications/{job}/audit"),
                                         {"admin": 403, "owner": 200, "other_owner": 404, "auditor": 200,
                                          "other_auditor": 404, **ANON}),
    "GET /v1/verifications/{id}/report": (get("/v1/verifications/{job}/report"),
                                          {"admin": 403, "owner": 200, "other_owner": 404, "auditor": 200,
                                           "other_auditor": 404, **ANON}),
    # The re-synchronized model is the reference owner's weights: its submitter may not have it.
    "GET /v1/verifications/{id}/resynced": (get("/v1/verifications/{job}/resynced"),
                                            {"admin": 403, "owner": 200, "other_owner": 404, "auditor": 403,
                                             "other_auditor": 404, **ANON}),
    "GET /v1/verifications/{id}/visuals": (_visuals,
                                           {"admin": 403, "owner": 200, "other_owner": 404, "auditor": 200,
                                            "other_auditor": 404, **ANON}),
    "GET /v1/verifications/{unknown-id}": (get("/v1/verifications/{missing}"),
                                           {"admin": 403, "owner": 404, "other_owner": 404, "auditor": 404,
                                            "other_auditor": 404, **ANON}),
    "GET /v1/audit/verify": (get("/v1/audit/verify"),
                             {"admin": 200, "owner": 403, "other_owner": 403, "auditor": 403, "other_auditor": 403,
                              **ANON}),
    "GET /v1/signing-keys": (get("/v1/signing-keys"), EVERYONE),
    "GET /v1/schemas/report": (get("/v1/schemas/report"), EVERYONE),
    "GET /healthz": (get("/healthz"), EVERYONE),
    "GET /readyz": (get("/readyz"), EVERYONE),
    "GET /metrics": (get("/metrics"), EVERYONE),
    "GET /openapi.json": (get("/openapi.json"), EVERYONE),
}


def test_matrix_covers_every_route(embedded) -> None:  # type: ignore[no-untyped-def]
    """A new route must be added to the matrix (every path of the OpenAPI document)."""
    app, _ = embedded
    served = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    served.add(("GET", "/openapi.json"))
    covered = {(name.split()[0], name.split()[1].replace("{unknown-id}", "{id}")) for name in MATRIX}
    normalized = {(m, p.replace("{reference_id}", "{id}").replace("{job_id}", "{id}")) for m, p in served}
    assert normalized == covered


@pytest.mark.parametrize("route", list(MATRIX))
@pytest.mark.parametrize("role", ROLES)
def test_access(world: World, route: str, role: str) -> None:
    call, expected = MATRIX[route]
    r = call(world, role)
    assert r.status_code == expected[role], (route, role, r.text[:300])
    if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
        assert set(r.json()["detail"]) >= {"code", "message"}


def test_listings_show_only_your_own(world: World) -> None:
    """200 on a listing must not mean seeing another tenant's objects."""
    other_refs = world.call("other_owner", "GET", "/v1/references").json()["items"]
    assert world.ref not in {x["id"] for x in other_refs}
    assert world.ref in {x["id"] for x in world.call("auditor", "GET", "/v1/references").json()["items"]}
    assert world.call("other_auditor", "GET", "/v1/references").json()["items"] == []
    shared = world.call("auditor", "GET", "/v1/references/{ref}").json()
    assert {"name", "version", "sha256", "groups", "spec"} <= set(shared) and "weights" not in shared
    for role in ("other_owner", "other_auditor"):
        jobs = world.call(role, "GET", "/v1/verifications").json()["items"]
        assert world.job not in {x["id"] for x in jobs}
    for role in ("owner", "auditor"):
        jobs = world.call(role, "GET", "/v1/verifications").json()["items"]
        assert world.job in {x["id"] for x in jobs}


def _needles(w: World, app: Any) -> dict[str, bytes]:
    """Byte strings that must never appear: keys, the server secret, weight and watermark-key
    data (raw, hex, base64 windows, and the decimal text of the first values)."""
    out: dict[str, bytes] = {"admin key": w.api.admin_key.encode(), "server secret": app.state.runtime.secret,
                             "bad key": BAD_KEY.encode()}
    for role in ("owner", "other_owner", "auditor", "other_auditor"):
        key = w.keys[role]
        assert key is not None
        out[f"{role} key"] = key.encode()
        out[f"{role} key secret part"] = key.split("_", 2)[2].encode()
    for label, path in (("weights", w.files.reference), ("watermark key", w.files.key)):
        raw = path.read_bytes()
        window = raw[-48:]  # the end of the data region: tensor bytes, not the JSON header
        out[f"{label} bytes"] = window
        out[f"{label} hex"] = window.hex().encode()
        out[f"{label} base64"] = base64.b64encode(window)[8:40]
        for name, t in load_file(str(path)).items():
            if t.is_floating_point():
                for i, v in enumerate(t.flatten()[:3].tolist()):
                    out[f"{label} {name}[{i}] as text"] = repr(v).encode()
    return out


def test_no_secret_in_any_response_or_log(embedded, world: World, caplog: pytest.LogCaptureFixture) -> None:
    """Run the whole matrix again with every logger at DEBUG, then search every response
    (headers and body) and every log line for keys, the secret, weights and watermark keys.
    The one place a key may appear is the body of the POST /v1/accounts that created it; the
    one place weights may appear is the owner's download of the re-synchronized model."""
    app, api = embedded
    caplog.set_level(logging.DEBUG)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "findlady", "sqlalchemy.engine"):
        caplog.set_level(logging.DEBUG, logger=name)
    world.seen.clear()
    for route, (call, _) in MATRIX.items():
        for role in ROLES:
            call(world, role)
    api.wait(world.keys["auditor"], world.job)  # type: ignore[arg-type]
    logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)

    texts: list[tuple[str, bytes]] = []
    for r in world.seen:
        body = r.content
        if r.request.method == "POST" and r.request.url.path == "/v1/accounts" and r.status_code == 201:
            created = r.json()
            created.pop("api_key")
            body = repr(created).encode()
        if r.request.url.path.endswith("/resynced") and r.status_code == 200:
            body = b""  # the reference's owner downloading its own weights, re-synchronized: the point
        headers = "\n".join(f"{k}: {v}" for k, v in r.headers.items()).encode()
        texts.append((f"{r.request.method} {r.request.url.path} -> {r.status_code}", headers + b"\n" + body))
    for rec in caplog.records:
        if rec.name.split(".")[0] in ("httpx", "httpcore"):
            continue  # the test's own client, not the server
        line = rec.getMessage() + (rec.exc_text or "")
        if rec.exc_info and not rec.exc_text:
            line += logging.Formatter().formatException(rec.exc_info)
        texts.append((f"log {rec.name}", line.encode("utf-8", "replace")))
    assert len(world.seen) >= len(MATRIX) * len(ROLES) and len(caplog.records) > 0

    needles = _needles(world, app)
    leaks = [(label, where) for label, needle in needles.items() for where, text in texts if needle in text]
    assert leaks == []
