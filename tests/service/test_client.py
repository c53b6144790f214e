"""``findlady client`` drives the README's flow end to end against a real server (uvicorn over
a socket), each step a ``findlady`` subprocess with the URL and key from the environment."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from safetensors.torch import load_file

from .helpers import FINDLADY, Files, auth


def findlady(url: str, key: str | None, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FINDLADY_URL", "FINDLADY_API_KEY")}
    env["FINDLADY_URL"] = url
    if key is not None:
        env["FINDLADY_API_KEY"] = key
    return subprocess.run([*FINDLADY, *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


def test_client_drives_the_readme_flow(embedded, files: Files, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, api = embedded
    url = str(api.http.base_url).rstrip("/")
    owner, auditor = api.account("owner"), api.account("auditor")
    auditor_id = api.http.get("/v1/accounts/me", headers=auth(auditor)).json()["id"]

    reg = findlady(url, owner, "client", "register", files.reference, "--name", "mnist-like",
                   "--spec", files.spec, "--key", files.key)
    assert reg.returncode == 0, reg.stderr
    ref_id = reg.stdout.strip()
    assert api.http.get(f"/v1/references/{ref_id}", headers=auth(owner)).json()["has_key"] is True

    shared = findlady(url, owner, "client", "share", ref_id, auditor_id)
    assert shared.returncode == 0 and auditor_id in shared.stdout, shared.stderr

    sub = findlady(url, auditor, "client", "submit", ref_id, files.suspect)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    waited = findlady(url, auditor, "client", "wait", job_id, "--timeout", "120", "--json")
    assert waited.returncode == 0, waited.stderr
    job = json.loads(waited.stdout)
    assert job["status"] == "succeeded" and job["report"]["verdict"] in ("match", "match_modified")

    report_file = tmp_path / "report.json"
    rep = findlady(url, auditor, "client", "report", job_id, "-o", report_file)
    assert rep.returncode == 0, rep.stderr
    envelope = json.loads(report_file.read_text())
    assert envelope["report"]["verdict"] == job["report"]["verdict"]
    check = findlady(url, None, "report", "verify", report_file, "--keys-url", f"{url}/v1/signing-keys")
    assert check.returncode == 0 and check.stdout.startswith("OK"), check.stdout + check.stderr

    # The owner also gets the re-synchronized model: it is the reference again.
    model = tmp_path / "resynced.safetensors"
    own = findlady(url, owner, "client", "report", job_id, "-o", tmp_path / "own.json", "--resynced", model)
    assert own.returncode == 0, own.stderr
    got, ref = load_file(str(model)), load_file(str(files.reference))
    assert all((got[k] == ref[k]).all() for k in ref)

    # An unrelated model: the job succeeds, the verdict is negative, wait exits 1.
    other = findlady(url, auditor, "client", "submit", ref_id, files.unrelated).stdout.strip()
    neg = findlady(url, auditor, "client", "wait", other, "--timeout", "120")
    assert neg.returncode == 1 and neg.stdout.strip() == "succeeded: no_match", neg.stdout + neg.stderr


def test_client_refusals_exit_2_with_the_reason(embedded, files: Files) -> None:  # type: ignore[no-untyped-def]
    _, api = embedded
    url = str(api.http.base_url).rstrip("/")
    auditor = api.account("auditor")
    denied = findlady(url, auditor, "client", "register", files.reference, "--name", "x")
    assert denied.returncode == 2 and "403 forbidden" in denied.stderr, denied.stderr
    nokey = findlady(url, None, "client", "wait", "00000000-0000-0000-0000-000000000000")
    assert nokey.returncode == 2 and "FINDLADY_API_KEY" in nokey.stderr
    down = findlady("http://127.0.0.1:9", auditor, "client", "wait", "x")
    assert down.returncode == 2 and "did not answer" in down.stderr
