"""A reference too large for its null to be computed in the request is prepared in the
background: it reads ``preparing``, jobs against it stay queued until it is ``ready``, and a
failed preparation fails them with its reason."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from app.main import create_app
from app.server import BackgroundServer
from app.services import prepare
from findlady_core import report
from findlady_core.errors import SpecError
from findlady_core.io import load_state_dict
from findlady_core.spec import Spec
from findlady_core.watermark import load_key

from .helpers import Api, Files, auth, test_settings


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Holds the background null until ``release`` is set; ``fail`` makes it raise instead."""
    state: dict[str, Any] = {"release": threading.Event(), "fail": None}
    real = prepare.reference_null_margin

    def held(*args: Any, **kwargs: Any) -> float:
        assert state["release"].wait(60)
        if state["fail"] is not None:
            raise state["fail"]
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare, "reference_null_margin", held)
    return state


def _reference(api: Api, key: str, ref_id: str) -> dict[str, Any]:
    r = api.http.get(f"/v1/references/{ref_id}", headers=auth(key))
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_jobs_wait_for_a_preparing_reference(tmp_path: Path, files: Files, gate: dict[str, Any]) -> None:
    settings = test_settings(tmp_path, prepare_sync_bytes=0, prepare_poll_seconds=0.2)
    with BackgroundServer(create_app(settings)) as server:
        api = Api(server.url, settings.admin_key_value())
        owner = api.account("owner")
        r = api.register(owner, "m", weights=files.reference, spec=files.spec, key=files.key)
        assert r.status_code == 201, r.text
        ref_id = r.json()["id"]
        assert r.json()["status"] == "preparing" and r.json()["status_error"] is None
        job_id = api.submit(owner, ref_id, files.suspect).json()["id"]
        time.sleep(1.5)  # several polls of the waiting job
        job = api.http.get(f"/v1/verifications/{job_id}", headers=auth(owner)).json()
        assert job["status"] == "queued" and job["attempts"] == 0
        assert _reference(api, owner, ref_id)["status"] == "preparing"

        gate["release"].set()
        done = api.wait(owner, job_id)
        assert _reference(api, owner, ref_id)["status"] == "ready"
    assert done["status"] == "succeeded", done["error"]
    ref_sd, key = load_state_dict(files.reference), load_key(files.key)
    expected = report.reference_null(ref_sd, Spec.load(files.spec), device="cpu",
                                     ignore=report.watermark_inputs(key, ref_sd))
    rep = done["report"]
    assert rep["resync"]["similarity"]["null_mean_margin"] == pytest.approx(expected)
    assert rep["timings"]["null"] == 0  # paid by the preparation, not by the job
    assert rep["verdict"] == "match"


def test_a_failed_preparation_fails_its_jobs_with_the_reason(tmp_path: Path, files: Files, gate: dict[str, Any]) -> None:
    settings = test_settings(tmp_path, prepare_sync_bytes=0, prepare_poll_seconds=0.2)
    gate["fail"] = SpecError("group 'fc1': the core refused this reference")
    with BackgroundServer(create_app(settings)) as server:
        api = Api(server.url, settings.admin_key_value())
        owner = api.account("owner")
        ref_id = api.register(owner, "m", weights=files.reference, spec=files.spec).json()["id"]
        job_id = api.submit(owner, ref_id, files.suspect).json()["id"]
        gate["release"].set()
        done = api.wait(owner, job_id)
        ref = _reference(api, owner, ref_id)
    assert ref["status"] == "failed"
    assert ref["status_error"]["message"] == "group 'fc1': the core refused this reference"
    assert done["status"] == "failed" and done["attempts"] == 0
    assert done["error"]["code"] == "reference_failed"
    assert "the core refused this reference" in done["error"]["message"]


def test_a_small_reference_is_ready_at_once(tmp_path: Path, files: Files) -> None:
    settings = test_settings(tmp_path)  # the default threshold: this MLP is far below it
    with BackgroundServer(create_app(settings)) as server:
        api = Api(server.url, settings.admin_key_value())
        owner = api.account("owner")
        r = api.register(owner, "m", weights=files.reference, spec=files.spec)
        assert r.status_code == 201 and r.json()["status"] == "ready"
