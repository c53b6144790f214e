"""Hostile input: every case is answered with a 4xx and a reason, never a 500, and leaves
nothing behind (row counts, blob count and temporary files unchanged). A malicious pickle's
payload never runs. Complements ``test_bad_input.py`` (the everyday mistakes).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from findlady_core.io import save_state_dict
from findlady_core.watermark import generate_key, save_key

from .helpers import SIZES, Files, auth, counts, settled_counts, mlp_spec, mlp_state_dict


class Evil:
    """Unpickling this runs ``touch MARKER`` (if anything ever unpickles it unsafely)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def safetensors_bytes(header: dict[str, Any], data: bytes, *, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _st_entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _torch_zip_with(extra: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> bytes:
    """A real torch.save archive with extra members appended (same root folder)."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    root = src.namelist()[0].split("/", 1)[0]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            z.writestr(info, src.read(info), compress_type=zipfile.ZIP_STORED)
        for name, data in extra.items():
            z.writestr(f"{root}/{name}", data, compress_type=compress)
    return out.getvalue()


@pytest.fixture(scope="module")
def hostile(files: Files, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The hostile files, written once."""
    d = tmp_path_factory.mktemp("hostile")
    marker = d / "PWNED"
    out: dict[str, Path] = {"marker": marker}

    def put(name: str, data: bytes) -> None:
        out[name] = d / name
        out[name].write_bytes(data)

    # Code execution attempts: a torch.save zip whose data.pkl calls os.system, and plain pickle.
    buf = io.BytesIO()
    torch.save({"fc1.weight": torch.zeros(2), "evil": Evil(marker)}, buf)
    put("evil_zip.pt", buf.getvalue())
    put("evil_pickle.pkl", pickle.dumps(Evil(marker)))
    # Archives: a zip bomb (one deflated member, small on disk, huge unpacked), a member
    # outside torch.save's names, a parent path, a TorchScript-like archive, not a zip at all.
    put("zip_bomb.pt", _torch_zip_with({"data/7": b"\0" * (64 * 1024 * 1024)}, zipfile.ZIP_DEFLATED))
    put("zip_foreign_member.pt", _torch_zip_with({"payload.sh": b"rm -rf /"}))
    put("zip_parent_path.pt", _torch_zip_with({"../../etc/cron.d/x": b"x"}))
    put("zip_torchscript.pt", _torch_zip_with({"code/__torch__.py": b"import os"}))
    put("zip_truncated.pt", _torch_zip_with({})[:300])
    # safetensors lies.
    ok = files.reference.read_bytes()
    put("st_truncated_header.safetensors", ok[:20])
    put("st_tiny.safetensors", b"\x05\0\0")
    put("st_header_over_limit.safetensors", struct.pack("<Q", 200 * 1024 * 1024) + b"{" + b" " * 100)
    put("st_header_past_eof.safetensors", struct.pack("<Q", 10_000) + b'{"a": 1}')
    put("st_offsets_past_eof.safetensors", safetensors_bytes({"w": _st_entry("F32", [1000], 0, 4000)}, b"\0" * 16))
    put("st_offsets_lie_about_size.safetensors", safetensors_bytes({"w": _st_entry("F32", [4], 0, 8)}, b"\0" * 8))
    put("st_overlap.safetensors", safetensors_bytes({"a": _st_entry("F32", [2], 0, 8), "b": _st_entry("F32", [2], 4, 12)},
                                                    b"\0" * 12))
    put("st_gap.safetensors", safetensors_bytes({"a": _st_entry("F32", [1], 4, 8)}, b"\0" * 8))
    put("st_negative_shape.safetensors", safetensors_bytes({"w": _st_entry("F32", [-4], 0, 0)}, b""))
    put("st_huge_shape.safetensors", safetensors_bytes({"w": _st_entry("F32", [2**31, 2**31], 0, 16)}, b"\0" * 16))
    put("st_bad_dtype.safetensors", safetensors_bytes({"w": _st_entry("F128", [1], 0, 16)}, b"\0" * 16))
    put("st_complex.safetensors", safetensors_bytes({"w": _st_entry("C64", [1], 0, 8)}, b"\0" * 8))
    put("st_duplicate_key.safetensors", b"".join([struct.pack("<Q", 105),
        b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
        b"\0" * 4]))
    put("st_not_json.safetensors", struct.pack("<Q", 6) + b"{nope}")
    put("st_not_utf8.safetensors", struct.pack("<Q", 4) + b"{\xff\xfe}")
    deep = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    put("st_deep_json.safetensors", struct.pack("<Q", len(deep)) + deep)
    put("st_long_tensor_name.safetensors", safetensors_bytes({"n" * 2000: _st_entry("F32", [1], 0, 4)}, b"\0" * 4))
    put("st_empty.safetensors", safetensors_bytes({}, b""))
    put("st_metadata_not_strings.safetensors", safetensors_bytes({"__metadata__": {"a": 1}, "w": _st_entry("F32", [1], 0, 4)},
                                                                 b"\0" * 4))
    put("empty.bin", b"")
    put("random.bin", os.urandom(4096))
    # Tensor values and types.
    sd = mlp_state_dict(0)
    for label, value in (("nan", float("nan")), ("inf", float("inf")), ("neginf", float("-inf"))):
        bad = {k: v.clone() for k, v in sd.items()}
        bad["fc2.weight"][3, 5] = value
        save_state_dict(bad, d / f"{label}.safetensors")
        out[label] = d / f"{label}.safetensors"
    ints = {k: (v * 100).to(torch.int32) for k, v in sd.items()}
    save_state_dict(ints, d / "ints.safetensors")
    out["ints"] = d / "ints.safetensors"
    extra = dict(sd, **{"fc9.weight": torch.zeros(3, 3)})
    save_state_dict(extra, d / "extra_tensor.safetensors")
    out["extra_tensor"] = d / "extra_tensor.safetensors"
    fewer = {k: v for k, v in sd.items() if k != "fc3.bias"}
    save_state_dict(fewer, d / "missing_tensor.safetensors")
    out["missing_tensor"] = d / "missing_tensor.safetensors"
    transposed = dict(sd, **{"fc2.weight": sd["fc2.weight"].T.contiguous()})
    save_state_dict(transposed, d / "transposed.safetensors")
    out["transposed"] = d / "transposed.safetensors"
    # Specs.
    def spec(name: str, mutate: Callable[[dict[str, Any]], Any]) -> None:
        s = mlp_spec()
        mutate(s)
        out[name] = d / f"{name}.json"
        out[name].write_text(json.dumps(s))

    spec("spec_missing_tensor", lambda s: s["groups"][0]["members"].append({"tensor": "nope.weight", "axis": 0}))
    spec("spec_duplicate_claim", lambda s: s["groups"][1]["members"].append({"tensor": "fc1.weight", "axis": 0}))
    spec("spec_duplicate_group", lambda s: s["groups"].append(s["groups"][0]))
    spec("spec_wrong_axis", lambda s: s["groups"][0]["members"].__setitem__(0, {"tensor": "fc1.weight", "axis": 2}))
    spec("spec_negative_axis", lambda s: s["groups"][0]["members"].__setitem__(0, {"tensor": "fc1.weight", "axis": -7}))
    spec("spec_axis_mismatch", lambda s: s["groups"][0]["members"].__setitem__(0, {"tensor": "fc1.weight", "axis": 1}))
    spec("spec_negative_size", lambda s: s["groups"][0].__setitem__("size", -48))
    spec("spec_zero_size", lambda s: s["groups"][0].__setitem__("size", 0))
    spec("spec_huge_size", lambda s: s["groups"][0].__setitem__("size", 10**18))
    spec("spec_float_size", lambda s: s["groups"][0].__setitem__("size", 48.5))
    spec("spec_wrong_format", lambda s: s.__setitem__("format", "findlady.spec/999"))
    spec("spec_no_groups", lambda s: s.__setitem__("groups", "all"))
    out["spec_array"] = d / "spec_array.json"
    out["spec_array"].write_text("[1, 2, 3]")
    out["spec_nan"] = d / "spec_nan.json"
    out["spec_nan"].write_text(json.dumps(mlp_spec()).replace("48", "NaN", 1))
    out["spec_deep"] = d / "spec_deep.json"
    out["spec_deep"].write_text("[" * 100_000 + "]" * 100_000)
    out["spec_binary"] = d / "spec_binary.json"
    out["spec_binary"].write_bytes(os.urandom(2048))
    # Watermark keys.
    save_key(generate_key("fc2.weight", (SIZES[2], SIZES[1] + 1), bits=8, seed=1), d / "key_wrong_shape.safetensors")
    out["key_wrong_shape"] = d / "key_wrong_shape.safetensors"
    save_key(generate_key("fc7.weight", (SIZES[2], SIZES[1]), bits=8, seed=1), d / "key_unknown_layer.safetensors")
    out["key_unknown_layer"] = d / "key_unknown_layer.safetensors"
    out["key_is_weights"] = files.reference
    return out


@pytest.fixture(scope="module")
def tenant(embedded, files: Files) -> dict[str, str]:  # type: ignore[no-untyped-def]
    _, api = embedded
    owner, auditor = api.account("owner"), api.account("auditor")
    ref = api.register(owner, "mlp", weights=files.reference, spec=files.spec, key=files.key)
    assert ref.status_code == 201, ref.text
    return {"owner": owner, "auditor": auditor, "ref": ref.json()["id"]}


def refused(app: Any, call: Callable[[], httpx.Response]) -> dict[str, Any]:
    """The call gets a 4xx with ``{detail: {code, message}}`` and changes nothing stored."""
    before = settled_counts(app)
    r = call()
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    body = r.json()
    assert body["detail"]["code"] and body["detail"]["message"], body
    assert counts(app) == before
    return body


# field -> hostile file; the other fields are the good reference files
REFERENCE_CASES: dict[str, tuple[str, str]] = {
    **{name: ("weights", name) for name in [
        "evil_zip.pt", "evil_pickle.pkl", "zip_bomb.pt", "zip_foreign_member.pt",
        "zip_parent_path.pt", "zip_torchscript.pt", "zip_truncated.pt", "st_truncated_header.safetensors",
        "st_tiny.safetensors", "st_header_over_limit.safetensors", "st_header_past_eof.safetensors",
        "st_offsets_past_eof.safetensors", "st_offsets_lie_about_size.safetensors", "st_overlap.safetensors",
        "st_gap.safetensors", "st_negative_shape.safetensors", "st_huge_shape.safetensors", "st_bad_dtype.safetensors",
        "st_complex.safetensors", "st_duplicate_key.safetensors", "st_not_json.safetensors", "st_not_utf8.safetensors",
        "st_deep_json.safetensors", "st_long_tensor_name.safetensors", "st_empty.safetensors",
        "st_metadata_not_strings.safetensors", "empty.bin", "random.bin", "nan", "inf", "neginf", "ints"]},
    **{name: ("spec", name) for name in [
        "spec_missing_tensor", "spec_duplicate_claim", "spec_duplicate_group", "spec_wrong_axis", "spec_negative_axis",
        "spec_axis_mismatch", "spec_negative_size", "spec_zero_size", "spec_huge_size", "spec_float_size",
        "spec_wrong_format", "spec_no_groups", "spec_array", "spec_nan", "spec_deep", "spec_binary"]},
    **{name: ("key", name) for name in [
        "key_wrong_shape", "key_unknown_layer", "key_is_weights", "evil_zip.pt", "zip_bomb.pt",
        "st_header_over_limit.safetensors", "nan"]},
}

SUSPECT_CASES = ["evil_zip.pt", "evil_pickle.pkl", "zip_bomb.pt", "st_offsets_past_eof.safetensors",
                 "st_header_over_limit.safetensors", "st_huge_shape.safetensors", "nan", "inf", "ints", "extra_tensor",
                 "missing_tensor", "transposed", "random.bin", "empty.bin"]


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_hostile_reference_upload(embedded, files: Files, hostile: dict[str, Path], tenant: dict[str, str],
                                  case: str) -> None:
    app, api = embedded
    field, name = REFERENCE_CASES[case]
    form: dict[str, Path | None] = {"weights": files.reference, "spec": files.spec, "key": None}
    form[field] = hostile[name]
    body = refused(app, lambda: api.register(tenant["owner"], "hostile", **form))
    # names the form field at fault (weights that fit no valid spec are the spec's problem)
    assert field in body["detail"]["message"] or "spec" in body["detail"]["message"], body
    assert not hostile["marker"].exists(), "the pickle payload ran"


@pytest.mark.parametrize("case", SUSPECT_CASES)
def test_hostile_suspect(embedded, hostile: dict[str, Path], tenant: dict[str, str], case: str) -> None:
    app, api = embedded
    body = refused(app, lambda: api.submit(tenant["auditor"], tenant["ref"], hostile[case]))
    assert "suspect" in body["detail"]["message"]
    assert not hostile["marker"].exists(), "the pickle payload ran"


def _multipart(api: Any, key: str, path: str, body: bytes, ctype: str) -> Callable[[], httpx.Response]:
    return lambda: api.http.post(path, content=body, headers={**auth(key), "Content-Type": ctype})


B = "bnd0123456789"
MP = f"multipart/form-data; boundary={B}"


def _part(name: str, data: bytes, filename: str | None = None) -> bytes:
    disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    return f"--{B}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"


def _end() -> bytes:
    return f"--{B}--\r\n".encode()


def multipart_cases(files: Files, tenant: dict[str, str]) -> dict[str, tuple[str, bytes, str]]:
    """name -> (path, raw body, content type)."""
    w = files.reference.read_bytes()
    s = files.suspect.read_bytes()
    ref = tenant["ref"].encode()
    return {
        "no_parts": ("/v1/references", _end(), MP),
        "empty_body": ("/v1/references", b"", MP),
        "no_boundary": ("/v1/references", _part("name", b"x") + _end(), "multipart/form-data"),
        "wrong_boundary": ("/v1/references", _part("name", b"x") + _end(), "multipart/form-data; boundary=other"),
        "not_multipart": ("/v1/references", b'{"name": "x"}', "application/json"),
        "urlencoded": ("/v1/references", b"name=x&weights=abc", "application/x-www-form-urlencoded"),
        "no_content_type": ("/v1/references", _part("name", b"x") + _end(), ""),
        "part_without_name": ("/v1/references", f"--{B}\r\nContent-Disposition: form-data\r\n\r\nx\r\n".encode() + _end(), MP),
        "only_name": ("/v1/references", _part("name", b"x") + _end(), MP),
        "weights_twice": ("/v1/references", _part("name", b"x") + _part("weights", w, "a") + _part("weights", w, "b") + _end(), MP),
        "name_twice": ("/v1/references", _part("name", b"x") + _part("name", b"y") + _part("weights", w, "a") + _end(), MP),
        "unknown_field": ("/v1/references", _part("name", b"x") + _part("weights", w, "a") + _part("../etc", b"1") + _end(), MP),
        "very_long_field_name": ("/v1/references", _part("n" * 20_000, b"x") + _end(), MP),
        "name_not_utf8": ("/v1/references", _part("name", b"\xff\xfe") + _part("weights", w, "a") + _end(), MP),
        "name_too_long": ("/v1/references", _part("name", b"n" * 201) + _part("weights", w, "a") + _end(), MP),
        "name_over_field_limit": ("/v1/references", _part("name", b"n" * 70_000) + _part("weights", w, "a") + _end(), MP),
        "name_blank": ("/v1/references", _part("name", b"   ") + _part("weights", w, "a") + _end(), MP),
        "unterminated": ("/v1/references", _part("name", b"x") + _part("weights", w, "a")[:-100], MP),
        "path_filename_bad_data": ("/v1/references", _part("name", b"x") + _part("weights", b"junk", "../../../etc/passwd")
                                   + _end(), MP),
        "long_filename_bad_data": ("/v1/references", _part("name", b"x") + _part("weights", b"junk", "f" * 50_000)
                                   + _end(), MP),
        "submit_no_parts": ("/v1/verifications", _end(), MP),
        "submit_no_suspect": ("/v1/verifications", _part("reference_id", ref) + _end(), MP),
        "submit_no_reference": ("/v1/verifications", _part("suspect", s, "s") + _end(), MP),
        "submit_reference_path": ("/v1/verifications", _part("reference_id", b"../../" + ref) + _part("suspect", s, "s")
                                  + _end(), MP),
        "submit_reference_very_long": ("/v1/verifications", _part("reference_id", b"a" * 60_000) + _part("suspect", s, "s")
                                       + _end(), MP),
        "submit_reference_sql": ("/v1/verifications", _part("reference_id", b"' OR 1=1 --") + _part("suspect", s, "s")
                                 + _end(), MP),
    }


CASE_NAMES = [
    "no_parts", "empty_body", "no_boundary", "wrong_boundary", "not_multipart", "urlencoded", "no_content_type",
    "part_without_name", "only_name", "weights_twice", "name_twice", "unknown_field", "very_long_field_name",
    "name_not_utf8", "name_too_long", "name_over_field_limit", "name_blank", "unterminated", "path_filename_bad_data",
    "long_filename_bad_data", "submit_no_parts", "submit_no_suspect", "submit_no_reference", "submit_reference_path",
    "submit_reference_very_long", "submit_reference_sql"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_hostile_multipart(embedded, files: Files, tenant: dict[str, str], case: str) -> None:
    app, api = embedded
    path, body, ctype = multipart_cases(files, tenant)[case]
    key = tenant["owner"] if path == "/v1/references" else tenant["auditor"]
    out = refused(app, _multipart(api, key, path, body, ctype))
    assert "etc/passwd" not in out["detail"]["message"] and "f" * 1000 not in out["detail"]["message"]


def test_path_like_filename_is_ignored(embedded, files: Files, tenant: dict[str, str], tmp_path: Path) -> None:
    """Client filenames are never used as paths: a good upload under a hostile filename is
    stored by content hash inside the blob store and nothing appears at the named path."""
    app, api = embedded
    target = tmp_path / "escaped"
    hostile_name = f"../../../../../../..{target}"
    body = (_part("name", b"pathy") + _part("allow_guess", b"true")
            + _part("weights", files.reference.read_bytes(), hostile_name) + _end())
    r = _multipart(api, tenant["owner"], "/v1/references", body, MP)()
    assert r.status_code == 201, r.text
    assert not target.exists()
    blobs = app.state.runtime.blobs
    assert blobs.exists(r.json()["sha256"]) and blobs.path(r.json()["sha256"]).is_relative_to(blobs.root)


def test_unknown_ids_of_every_shape_are_404(embedded, tenant: dict[str, str]) -> None:
    _, api = embedded
    for job_id in [str(uuid.uuid4()), "x" * 5000, "..%2F..%2Fetc%2Fpasswd", "%00", "' OR 1=1 --", "-1", "1e308"]:
        for suffix in ("", "/audit"):
            r = api.http.get(f"/v1/verifications/{job_id}{suffix}", headers=auth(tenant["auditor"]))
            assert r.status_code == 404, (job_id, r.status_code, r.text[:200])
    for ref_id in [str(uuid.uuid4()), "y" * 5000, "' OR 1=1 --"]:
        r = api.http.get(f"/v1/references/{ref_id}", headers=auth(tenant["owner"]))
        assert r.status_code == 404, (ref_id, r.text[:200])
    for limit in ("-5", "0", "99999999999999999999", "abc"):
        r = api.http.get("/v1/verifications", params={"limit": limit}, headers=auth(tenant["auditor"]))
        assert r.status_code in (200, 422), (limit, r.status_code)


def test_hostile_json_account_bodies(embedded) -> None:
    app, api = embedded
    h = auth(api.admin_key)
    for body in [b"", b"null", b"[]", b'{"name": "x", "role": "root"}', b'{"name": "", "role": "owner"}',
                 b'{"name": "' + b"n" * 300 + b'", "role": "owner"}', b"[" * 50_000, b'{"name": 1e999, "role": "owner"}',
                 b'\xff\xfe{"name": "x"}']:
        refused(app, lambda: api.http.post("/v1/accounts", content=body, headers={**h, "Content-Type": "application/json"}))
