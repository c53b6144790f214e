"""Signed reports: checked with an independent Ed25519 implementation (PyNaCl, not the
service's ``cryptography`` code path) and with ``findlady report verify``; one flipped field
fails; a report signed before a key rotation still verifies. Also the published schema and the
owner's download of the re-synchronized suspect."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import subprocess
from pathlib import Path

import nacl.exceptions
import nacl.signing
import pytest
from safetensors.torch import load_file

from app.core.signing import SigningKeys
from report_schema import assert_valid

from .helpers import FINDLADY, Files, auth


@pytest.fixture(scope="module")
def job(embedded, files: Files) -> dict:  # type: ignore[no-untyped-def]
    _, api = embedded
    owner, auditor = api.account("owner"), api.account("auditor")
    ref = api.register(owner, "signed", weights=files.reference, spec=files.spec, key=files.key)
    assert ref.status_code == 201, ref.text
    r = api.submit(auditor, ref.json()["id"], files.suspect)
    assert r.status_code == 202, r.text
    done = api.wait(auditor, r.json()["id"])
    assert done["status"] == "succeeded", done
    return {"id": done["id"], "owner": owner, "auditor": auditor}


def canonical(report: dict) -> bytes:
    """The documented signing input, written out here rather than imported from the service."""
    return json.dumps(report, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def nacl_verify(envelope: dict, keys: dict) -> bool:
    published = {k["key_id"]: base64.b64decode(k["public_key"]) for k in keys["keys"]}
    raw = published[envelope["signature"]["key_id"]]
    assert envelope["signature"]["key_id"] == hashlib.sha256(raw).hexdigest()[:16]
    try:
        nacl.signing.VerifyKey(raw).verify(canonical(envelope["report"]), base64.b64decode(envelope["signature"]["value"]))
    except nacl.exceptions.BadSignatureError:
        return False
    return True


def cli_verify(envelope_path: Path, *keys_args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FINDLADY, "report", "verify", str(envelope_path), *keys_args],
                          capture_output=True, text=True, timeout=120)


def test_signed_report_verifies_independently_and_by_cli(embedded, job: dict, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, api = embedded
    r = api.http.get(f"/v1/verifications/{job['id']}/report", headers=auth(job["auditor"]))
    assert r.status_code == 200, r.text
    envelope = r.json()
    assert envelope["format"] == "findlady.signed-report/1" and envelope["signature"]["alg"] == "Ed25519"
    assert len(base64.b64decode(envelope["signature"]["value"], validate=True)) == 64
    assert_valid(envelope["report"])
    keys = api.http.get("/v1/signing-keys").json()  # public: no key sent
    assert all(len(base64.b64decode(k["public_key"], validate=True)) == 32 for k in keys["keys"])
    assert nacl_verify(envelope, keys)

    env_file, keys_file = tmp_path / "report.json", tmp_path / "keys.json"
    env_file.write_text(json.dumps(envelope))
    keys_file.write_text(json.dumps(keys))
    ok = cli_verify(env_file, "--keys", str(keys_file))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert cli_verify(env_file, "--keys-url", f"{api.http.base_url}/v1/signing-keys").returncode == 0

    # One field flipped: both implementations refuse, the CLI exits 1.
    for mutate in (lambda rep: rep.__setitem__("verdict", "no_match"),
                   lambda rep: rep["watermark"].__setitem__("bit_errors", rep["watermark"]["bit_errors"] + 1)):
        forged = copy.deepcopy(envelope)
        mutate(forged["report"])
        assert not nacl_verify(forged, keys)
        env_file.write_text(json.dumps(forged))
        bad = cli_verify(env_file, "--keys", str(keys_file))
        assert bad.returncode == 1, bad.stdout + bad.stderr
        assert "INVALID" in bad.stdout

    # Bad input is 2: not JSON, not an envelope, a key list of the wrong shape.
    env_file.write_text("{not json")
    assert cli_verify(env_file, "--keys", str(keys_file)).returncode == 2
    env_file.write_text(json.dumps({"report": {}}))
    assert cli_verify(env_file, "--keys", str(keys_file)).returncode == 2
    env_file.write_text(json.dumps(envelope))
    keys_file.write_text(json.dumps({"keys": [{"alg": "Ed25519", "key_id": "x", "public_key": "AAAA"}]}))
    assert cli_verify(env_file, "--keys", str(keys_file)).returncode == 2


def test_report_signed_before_rotation_still_verifies(embedded, job: dict, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    app, api = embedded
    before = api.http.get(f"/v1/verifications/{job['id']}/report", headers=auth(job["owner"])).json()
    new_id = SigningKeys(app.state.settings).rotate()
    after = api.http.get(f"/v1/verifications/{job['id']}/report", headers=auth(job["owner"])).json()
    assert after["signature"]["key_id"] == new_id != before["signature"]["key_id"]
    keys = api.http.get("/v1/signing-keys").json()
    assert keys["keys"][0]["key_id"] == new_id
    assert before["signature"]["key_id"] in {k["key_id"] for k in keys["keys"]}
    assert nacl_verify(before, keys) and nacl_verify(after, keys)
    env_file = tmp_path / "old.json"
    env_file.write_text(json.dumps(before))
    assert cli_verify(env_file, "--keys-url", f"{api.http.base_url}/v1/signing-keys").returncode == 0
    # A key list without the retired key no longer vouches for the old report: exit 1.
    current_only = tmp_path / "current.json"
    current_only.write_text(json.dumps({"keys": keys["keys"][:1]}))
    assert cli_verify(env_file, "--keys", str(current_only)).returncode == 1


def test_schema_is_published_and_reports_follow_it(embedded, job: dict) -> None:  # type: ignore[no-untyped-def]
    _, api = embedded
    served = api.http.get("/v1/schemas/report")
    assert served.status_code == 200 and served.headers["content-type"].startswith("application/schema+json")
    repo = Path(__file__).resolve().parents[2] / "findlady_core" / "schemas" / "report-2.json"
    assert served.json() == json.loads(repo.read_text())
    plain = api.http.get(f"/v1/verifications/{job['id']}", headers=auth(job["auditor"])).json()["report"]
    full = api.http.get(f"/v1/verifications/{job['id']}", params={"include": "permutations"},
                        headers=auth(job["auditor"])).json()["report"]
    assert_valid(plain)
    assert_valid(full)
    assert all("permutation" not in g for g in plain["resync"]["groups"])
    assert all(sorted(g["permutation"]) == list(range(g["size"])) for g in full["resync"]["groups"])
    assert api.http.get(f"/v1/verifications/{job['id']}", params={"include": "weights"},
                        headers=auth(job["auditor"])).status_code == 422
    openapi = api.http.get("/openapi.json").json()
    assert openapi["components"]["schemas"]["Report"]["properties"]["verdict"]["enum"] == [
        "match", "match_modified", "no_match", "inconclusive"]


def test_owner_downloads_the_resynchronized_suspect(embedded, job: dict, files: Files, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, api = embedded
    r = api.http.get(f"/v1/verifications/{job['id']}/resynced", headers=auth(job["owner"]))
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    out = tmp_path / "resynced.safetensors"
    out.write_bytes(r.content)
    # The suspect is the reference with every group permuted: re-synchronized, it is the reference.
    got, ref = load_file(str(out)), load_file(str(files.reference))
    assert set(got) == set(ref) and all((got[k] == ref[k]).all() for k in ref)
    assert api.http.get(f"/v1/verifications/{job['id']}/resynced", headers=auth(job["auditor"])).status_code == 403
