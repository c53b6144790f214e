"""Bad input gets a clear 4xx and leaves nothing behind: no row, no blob, no temporary file."""

from __future__ import annotations

import secrets
import uuid

import httpx
import pytest

from .helpers import Files, auth, counts, settled_counts


@pytest.fixture(scope="module")
def tenants(embedded, files: Files):  # type: ignore[no-untyped-def]
    app, api = embedded
    owner, other, auditor = api.account("owner"), api.account("owner"), api.account("auditor")
    ref = api.register(owner, "mlp", weights=files.reference, spec=files.spec, key=files.key).json()
    return {"owner": owner, "other": other, "auditor": auditor, "ref": ref["id"]}


def refused(app, call, status: int, code: str | None, says: str | None = None) -> dict:  # type: ignore[no-untyped-def]
    before = settled_counts(app)
    r = call()
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["detail"]) >= {"code", "message"}
    if code is not None:
        assert body["detail"]["code"] == code, body
    if says is not None:
        assert says in body["detail"]["message"], body
    assert counts(app) == before
    return body


REFERENCE_CASES = {
    # name: (form files, status, code, words the message must contain)
    "pickle": ({"weights": "pickle.pt"}, 422, "bad_weights", "pickle"),
    "truncated": ({"weights": "truncated.safetensors"}, 422, "bad_weights", "weights"),
    "spec_missing_tensor": ({"weights": "reference.safetensors", "spec": "missing_tensor_spec.json"}, 422, "bad_spec",
                            "fc9.weight"),
    "spec_not_json": ({"weights": "reference.safetensors", "spec": "not_json_spec.json"}, 422, "bad_spec", "JSON"),
    "key_layer_not_in_spec": ({"weights": "reference.safetensors", "spec": "one_group_spec.json",
                               "key": "fc3_key.safetensors"}, 422, "bad_key", "fc3.weight"),
    "key_not_a_key": ({"weights": "reference.safetensors", "spec": "spec.json", "key": "pickle.pt"}, 422, "bad_key", None),
    "no_weights": ({"spec": "spec.json"}, 422, "missing_field", "weights"),
}


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_bad_reference_upload(embedded, files: Files, tenants, case: str) -> None:
    app, api = embedded
    form, status, code, says = REFERENCE_CASES[case]
    paths = {k: files.path(v) for k, v in form.items()}
    refused(app, lambda: api.register(tenants["owner"], "bad", **paths), status, code, says)


def test_truncated_weights_message_names_the_problem(embedded, files: Files, tenants) -> None:
    app, api = embedded
    body = refused(app, lambda: api.register(tenants["owner"], "bad", weights=files.path("truncated.safetensors")),
                   422, "bad_weights")
    assert "upload-" not in body["detail"]["message"]  # names the form field, not our temp file


def test_oversized_upload_is_413(embedded, files: Files, tenants) -> None:
    app, api = embedded
    limit = app.state.settings.max_upload_bytes
    big = files.path("big.safetensors")
    big.write_bytes(secrets.token_bytes(limit + 1))
    refused(app, lambda: api.register(tenants["owner"], "big", weights=big), 413, "too_large")


def test_oversized_streamed_upload_is_cut_off(embedded, tenants) -> None:
    """Without a Content-Length the body is counted as it arrives and refused at the cap,
    long before the client has sent it all."""
    app, api = embedded
    limit = app.state.settings.max_upload_bytes
    sent = 0
    boundary = "b" * 16

    def body():  # type: ignore[no-untyped-def]
        nonlocal sent
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nx\r\n--{boundary}\r\n"
                f"Content-Disposition: form-data; name=\"weights\"; filename=\"w\"\r\n\r\n").encode()
        yield head
        chunk = b"\0" * 65536
        while sent < 50 * limit:
            sent += len(chunk)
            yield chunk

    before = settled_counts(app)
    headers = {**auth(tenants["owner"]), "Content-Type": f"multipart/form-data; boundary={boundary}"}
    try:
        r = api.http.post("/v1/references", content=body(), headers=headers)
        assert r.status_code == 413, r.text
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        pass  # the server hung up on the rest of the body: also a refusal
    assert sent < 10 * limit
    assert counts(app) == before


def test_malformed_multipart_and_unknown_fields(embedded, files: Files, tenants) -> None:
    app, api = embedded
    h = auth(tenants["owner"])
    refused(app, lambda: api.http.post("/v1/references", headers=h, json={"name": "x"}), 415, "unsupported_media_type")
    unfinished = b"--zz\r\nContent-Disposition: form-data; name=\"weights\"; filename=\"w\"\r\n\r\nabc"
    refused(app, lambda: api.http.post("/v1/references", content=unfinished,
                                      headers={**h, "Content-Type": "multipart/form-data; boundary=zz"}),
            400, "bad_multipart")
    with files.reference.open("rb") as fh:
        refused(app, lambda: api.http.post("/v1/references", headers=h, data={"name": "x", "extra": "1"},
                                          files={"weights": fh}), 422, "unknown_field", "extra")


SUBMIT_CASES = {
    # name: (who, reference, suspect file, status, code, words)
    "other_shapes": ("auditor", "ref", "other_shapes.safetensors", 422, "shape_mismatch", "tensor 'fc1.weight' has shape (48, 9)"),
    "too_wide": ("auditor", "ref", "too_wide.safetensors", 422, "shape_mismatch", "more than 2x"),
    "pickle_suspect": ("auditor", "ref", "pickle.pt", 422, "bad_weights", "pickle"),
    "truncated_suspect": ("auditor", "ref", "truncated.safetensors", 422, "bad_weights", None),
    "unknown_reference": ("auditor", "unknown", "suspect.safetensors", 404, "not_found", None),
    "not_a_uuid": ("auditor", "not-a-uuid", "suspect.safetensors", 404, "not_found", None),
    "other_tenants_reference": ("other", "ref", "suspect.safetensors", 404, "not_found", None),
}


@pytest.mark.parametrize("case", list(SUBMIT_CASES))
def test_bad_submission(embedded, files: Files, tenants, case: str) -> None:
    app, api = embedded
    who, ref, suspect, status, code, says = SUBMIT_CASES[case]
    ref_id = {"ref": tenants["ref"], "unknown": str(uuid.uuid4())}.get(ref, ref)
    refused(app, lambda: api.submit(tenants[who], ref_id, files.path(suspect)), status, code, says)


def test_a_wider_suspect_is_accepted(embedded, files: Files, tenants) -> None:  # type: ignore[no-untyped-def]
    """A width group may differ (split or dummy neurons, at most 2x): queued, not refused."""
    app, api = embedded
    r = api.submit(tenants["auditor"], tenants["ref"], files.path("wider.safetensors"))
    assert r.status_code == 202, r.text


@pytest.mark.parametrize("key", [None, "wrong", "fl_0123456789ab_nope", "admin"])
def test_missing_or_wrong_key(embedded, files: Files, tenants, key: str | None) -> None:
    app, api = embedded
    headers = {} if key is None else auth(api.admin_key if key == "admin" else key)
    status = 403 if key == "admin" else 401  # the admin is known but may not submit
    with files.suspect.open("rb") as fh:
        refused(app, lambda: api.http.post("/v1/verifications", headers=headers, data={"reference_id": tenants["ref"]},
                                          files={"suspect": fh}), status, None)
