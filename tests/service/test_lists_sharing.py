"""Light lists (summaries, cursor pages, validated queries), sharing a reference with auditors,
and registration refusing a watermark key that does not read on the reference."""

from __future__ import annotations

from datetime import timedelta

import pytest

from app.models import JobStatus, Verification, utcnow

from .helpers import Files, auth, counts, settled_counts

JOBS = 100


@pytest.fixture(scope="module")
def world(embedded, files: Files) -> dict:  # type: ignore[no-untyped-def]
    app, api = embedded
    owner, auditor = api.account("owner"), api.account("auditor")
    ref = api.register(owner, "listed", weights=files.reference, spec=files.spec, key=files.key).json()
    first = api.submit(auditor, ref["id"], files.suspect).json()
    done = api.wait(auditor, first["id"])
    assert done["status"] == "succeeded"
    # 99 more finished jobs with the real (full, permutations included) report, written
    # directly: the list's payload is the point here, not 99 more verifications.
    rt = app.state.runtime
    with rt.sessions() as s:
        real = s.get(Verification, first["id"])
        assert real is not None
        start = utcnow()
        for i in range(JOBS - 1):
            s.add(Verification(reference_id=ref["id"], submitter_id=real.submitter_id, suspect_sha256=real.suspect_sha256,
                               suspect_size_bytes=real.suspect_size_bytes, status=JobStatus.SUCCEEDED, attempts=1,
                               report=real.report, created_at=start - timedelta(seconds=i + 1),
                               started_at=start, finished_at=start))
        s.commit()
    return {"owner": owner, "auditor": auditor, "ref": ref, "first": first["id"]}


def test_hundred_jobs_list_under_50_kb(embedded, world: dict) -> None:  # type: ignore[no-untyped-def]
    _, api = embedded
    r = api.http.get("/v1/verifications", params={"limit": JOBS}, headers=auth(world["auditor"]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["items"]) == JOBS and body["next_cursor"] is None
    print(f"list of {JOBS} jobs: {len(r.content)} bytes")
    assert len(r.content) < 50_000, len(r.content)
    one = api.http.get(f"/v1/verifications/{world['first']}", headers=auth(world["auditor"]))
    assert len(r.content) < len(one.content) * JOBS / 5  # the reports are not in the list
    item = body["items"][0]
    assert item["id"] == world["first"] and item["verdict"] in ("match", "match_modified")
    assert item["reference_name"] == "listed" and item["reference_version"] == 1 and "report" not in item


def test_cursor_pages_cover_every_job_once(embedded, world: dict) -> None:  # type: ignore[no-untyped-def]
    _, api = embedded
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 30, **({"cursor": cursor} if cursor else {})}
        page = api.http.get("/v1/verifications", params=params, headers=auth(world["owner"])).json()
        seen += [x["id"] for x in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == JOBS == len(set(seen))
    assert seen[0] == world["first"]  # newest first


@pytest.mark.parametrize("query", [{"status": "bogus"}, {"limit": 0}, {"limit": 10_000}, {"reference_id": "nope"},
                                   {"cursor": "not-a-cursor"}, {"cursor": "WyJ4Il0"}])
def test_bad_list_queries_are_422(embedded, world: dict, query: dict) -> None:  # type: ignore[no-untyped-def]
    _, api = embedded
    r = api.http.get("/v1/verifications", params=query, headers=auth(world["owner"]))
    assert r.status_code == 422, (query, r.text)
    assert {"code", "message"} <= set(r.json()["detail"])
    if "cursor" in query:
        assert api.http.get("/v1/references", params=query, headers=auth(world["owner"])).status_code == 422


def test_status_filter_and_reference_pages(embedded, world: dict, files: Files) -> None:  # type: ignore[no-untyped-def]
    _, api = embedded
    queued = api.http.get("/v1/verifications", params={"status": "queued"}, headers=auth(world["owner"])).json()
    assert queued["items"] == []
    for i in range(3):
        assert api.register(world["owner"], f"page-{i}", weights=files.reference, spec=files.spec).status_code == 201
    names, cursor = [], None
    while True:
        page = api.http.get("/v1/references", params={"limit": 1, **({"cursor": cursor} if cursor else {})},
                            headers=auth(world["owner"])).json()
        names += [x["name"] for x in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert names == ["listed", "page-0", "page-1", "page-2"]


def test_sharing_lets_an_auditor_list_and_read(embedded, world: dict) -> None:  # type: ignore[no-untyped-def]
    _, api = embedded
    ref_id = world["ref"]["id"]
    reader = api.account("auditor")
    reader_id = api.http.get("/v1/accounts/me", headers=auth(reader)).json()["id"]
    assert api.http.get(f"/v1/references/{ref_id}", headers=auth(reader)).status_code == 404
    r = api.http.post(f"/v1/references/{ref_id}/shares", json={"auditor_id": reader_id}, headers=auth(world["owner"]))
    assert r.status_code == 201 and r.json()["auditor_id"] == reader_id
    listed = api.http.get("/v1/references", headers=auth(reader)).json()["items"]
    assert [x["id"] for x in listed] == [ref_id]
    shown = api.http.get(f"/v1/references/{ref_id}", headers=auth(reader))
    assert shown.status_code == 200
    assert shown.json()["sha256"] == world["ref"]["sha256"] and shown.json()["groups"] == 2
    assert "weights" not in shown.text and "key_sha256" not in shown.json()
    shares = api.http.get(f"/v1/references/{ref_id}/shares", headers=auth(world["owner"])).json()["items"]
    assert [s["auditor_id"] for s in shares] == [reader_id]
    # Only auditors can be shared with; unsharing takes it away again.
    owner_id = api.http.get("/v1/accounts/me", headers=auth(world["owner"])).json()["id"]
    bad = api.http.post(f"/v1/references/{ref_id}/shares", json={"auditor_id": owner_id}, headers=auth(world["owner"]))
    assert bad.status_code == 422 and bad.json()["detail"]["code"] == "not_an_auditor"
    assert api.http.delete(f"/v1/references/{ref_id}/shares/{reader_id}", headers=auth(world["owner"])).status_code == 204
    assert api.http.get(f"/v1/references/{ref_id}", headers=auth(reader)).status_code == 404
    assert api.http.get("/v1/references", headers=auth(reader)).json()["items"] == []
    assert api.http.delete(f"/v1/references/{ref_id}/shares/{reader_id}", headers=auth(world["owner"])).status_code == 404


def test_registration_refuses_a_key_that_does_not_read(embedded, files: Files) -> None:  # type: ignore[no-untyped-def]
    """The unrelated model carries no watermark: its key would make every copy look damaged."""
    app, api = embedded
    owner = api.account("owner")
    before = settled_counts(app)
    r = api.register(owner, "no-mark", weights=files.unrelated, spec=files.spec, key=files.key)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail["code"] == "key_not_detected" and "bit errors" in detail["message"] and "fc2.weight" in detail["message"]
    after = counts(app)
    assert {k: after[k] for k in ("reference_models", "blobs", "tmp_files")} == {
        k: before[k] for k in ("reference_models", "blobs", "tmp_files")}
