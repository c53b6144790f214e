"""``GET /v1/verifications/{id}/visuals`` and the dashboard's pages over HTTP (no browser)."""

from __future__ import annotations

import re
from importlib import resources

from app.main import create_app
from app.server import BackgroundServer

from .helpers import KEY_BITS, Api, Files, auth, test_settings


def test_visuals_of_a_finished_job(embedded, files: Files) -> None:
    _, api = embedded
    owner, auditor, stranger = api.account("owner"), api.account("auditor"), api.account("owner")
    ref = api.register(owner, "vis-mlp", weights=files.reference, spec=files.spec, key=files.key).json()
    job = api.submit(auditor, ref["id"], files.suspect).json()
    done = api.wait(auditor, job["id"])
    assert done["status"] == "succeeded"
    url = f"/v1/verifications/{job['id']}/visuals"

    r = api.http.get(url, headers=auth(auditor))
    assert r.status_code == 200, r.text
    v = r.json()
    assert v["format"] == "findlady.visuals/1" and "matrices" not in v
    assert [g["name"] for g in v["groups"]] == ["fc1", "fc2"]
    assert v["group"] == "fc1"  # the largest group by default (48 neurons)
    m = v["matrix"]
    assert m["size"] == 48 and len(m["before"]) == len(m["after"]) == 48
    # before: the suspect's order, where the attack put reference neuron i; after: the diagonal
    p = files.truth["fc1"]
    assert [m["before"][i][p[i]] for i in range(48)] == [m["after"][i][i] for i in range(48)]
    assert all(row.index(max(row)) == i for i, row in enumerate(m["after"]))
    wm = v["watermark"]
    assert wm["after"] == wm["key"] and len(wm["key"]) == KEY_BITS
    assert sum(a != b for a, b in zip(wm["before"], wm["key"])) == done["report"]["watermark"]["bit_errors_before_resync"]
    assert sum(v["margins"]["counts"]) == 48 + 32

    fc2 = api.http.get(url, params={"group": "fc2"}, headers=auth(owner))  # the reference's owner sees it too
    assert fc2.status_code == 200 and fc2.json()["matrix"]["size"] == 32

    bad = api.http.get(url, params={"group": "fc9"}, headers=auth(owner))
    assert bad.status_code == 422 and bad.json()["detail"]["code"] == "unknown_group"
    assert "fc1, fc2" in bad.json()["detail"]["message"]
    assert api.http.get(url, headers=auth(stranger)).status_code == 404  # another tenant: it does not exist
    assert api.http.get(url).status_code == 401


def test_visuals_wait_for_the_job(tmp_path, files: Files) -> None:
    settings = test_settings(tmp_path)
    with BackgroundServer(create_app(settings, workers=False)) as server:  # no worker: jobs stay queued
        api = Api(server.url, settings.admin_key_value())
        owner = api.account("owner")
        ref = api.register(owner, "m", weights=files.reference, spec=files.spec).json()
        job = api.submit(owner, ref["id"], files.suspect).json()
        r = api.http.get(f"/v1/verifications/{job['id']}/visuals", headers=auth(owner))
    assert r.status_code == 409 and r.json()["detail"]["code"] == "not_finished" and r.headers["retry-after"]


def test_pages_and_assets_carry_a_strict_csp(embedded) -> None:
    _, api = embedded
    for path in ("/ui/", "/ui/verifications/abc", "/ui/references/abc"):
        r = api.http.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe" not in csp
        assert 'src="/ui/assets/app.js"' in r.text
    assert api.http.get("/ui/assets/app.js").headers["content-type"].startswith("text/javascript")
    assert api.http.get("/ui/assets/../main.py").status_code == 404
    assert api.http.get("/ui/assets/nope.js").status_code == 404
    home = api.http.get("/", follow_redirects=False)
    assert home.status_code == 307 and home.headers["location"] == "/ui/"
    assert "/ui/" not in api.http.get("/openapi.json").json()["paths"]  # pages are not API


def test_assets_load_nothing_from_elsewhere() -> None:
    """No CDN: no asset names another origin (the SVG namespace is a name, not a load)."""
    folder = resources.files("app.ui")
    names = [f.name for f in folder.iterdir() if f.name.endswith((".html", ".js", ".css", ".svg"))]
    assert {"index.html", "app.js", "api.js", "draw.js", "style.css", "favicon.svg"} <= set(names)
    for name in names:
        text = folder.joinpath(name).read_text()
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'`)]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (name, urls)
        assert "<script>" not in text and "eval(" not in text and "innerHTML" not in text, name
