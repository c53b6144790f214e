"""Job semantics on the embedded default: takeover after a dead worker, retries, idempotence."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from app.jobs import runner
from app.jobs.queue import ThreadQueue
from app.jobs.runner import run_verification
from app.jobs.sweeper import Sweeper
from app.main import create_app
from app.models import AuditEvent, Verification, utcnow
from app.server import BackgroundServer

from .helpers import Api, Files, test_settings


def _kinds(app, job_id: str) -> list[tuple[str, dict]]:  # type: ignore[no-untyped-def]
    with app.state.runtime.sessions() as s:
        rows = s.scalars(select(AuditEvent).where(AuditEvent.job_id == job_id).order_by(AuditEvent.seq))
        return [(e.kind, e.payload) for e in rows]


def test_dead_worker_job_is_taken_over_after_its_lease(tmp_path: Path, files: Files) -> None:
    """A job left `running` by a dead process (expired lease) is re-sent by the sweeper and
    finished by the next attempt; re-running a finished job changes nothing."""
    settings = test_settings(tmp_path)
    app = create_app(settings, workers=False)  # nobody consumes: the job stays queued
    with BackgroundServer(app) as server:
        api = Api(server.url, settings.admin_key_value())
        owner = api.account("owner")
        ref = api.register(owner, "m", weights=files.reference, spec=files.spec, key=files.key).json()
        job_id = api.submit(owner, ref["id"], files.suspect).json()["id"]
        rt = app.state.runtime
        long_ago = utcnow() - timedelta(minutes=5)
        with rt.sessions() as s:  # what a worker killed in the middle of attempt 1 leaves behind
            s.execute(update(Verification).where(Verification.id == job_id).values(
                status="running", attempts=1, started_at=long_ago, lease_expires_at=long_ago, enqueued_at=long_ago))
            s.commit()

        jobs = ThreadQueue(rt)
        assert Sweeper(rt, jobs).sweep_once() == [job_id]  # re-sent once ...
        assert Sweeper(rt, jobs).sweep_once() == []  # ... not again at the next sweep
        jobs.start()
        try:
            done = api.wait(owner, job_id, timeout=120)
        finally:
            jobs.stop()
        assert done["status"] == "succeeded" and done["attempts"] == 2
        assert done["report"]["watermark"]["bit_errors"] == 0
        started = [p for k, p in _kinds(app, job_id) if k == "verification.started"]
        assert started == [{"attempt": 2, "takeover": True}]

        assert run_verification(job_id=job_id, runtime=rt).status == "noop"
        again = api.wait(owner, job_id)
        assert again["attempts"] == 2 and again["report"] == done["report"]
        assert [k for k, _ in _kinds(app, job_id)].count("verification.succeeded") == 1


def test_stale_attempt_cannot_overwrite_the_new_one(tmp_path: Path, files: Files) -> None:
    settings = test_settings(tmp_path)
    app = create_app(settings, workers=False)
    with BackgroundServer(app) as server:
        api = Api(server.url, settings.admin_key_value())
        owner = api.account("owner")
        ref = api.register(owner, "m", weights=files.reference, spec=files.spec).json()
        job_id = api.submit(owner, ref["id"], files.suspect).json()["id"]
        rt = app.state.runtime
        assert runner._claim(rt, job_id) == 1
        assert runner._claim(rt, job_id).status == "busy"  # live lease: hands off
        with rt.sessions() as s:
            expired = utcnow() - timedelta(seconds=1)
            s.execute(update(Verification).where(Verification.id == job_id).values(lease_expires_at=expired))
            s.commit()
        assert runner._claim(rt, job_id) == 2  # the lease expired: attempt 2 takes over
        assert runner._finish(rt, job_id, 1, {"verdict": "forged"}).status == "superseded"
        assert runner._finish(rt, job_id, 2, {"verdict": "match"}).status == "succeeded"
        job = api.wait(owner, job_id)
        assert job["report"] == {"verdict": "match"} and job["attempts"] == 2


@pytest.mark.parametrize("transient", [True, False])
def test_errors_are_retried_then_recorded(tmp_path: Path, files: Files, monkeypatch: pytest.MonkeyPatch,
                                          transient: bool) -> None:
    """An unexpected error is retried up to job_max_attempts, then recorded; bad input in the
    stored files fails at once (retrying cannot help)."""
    from findlady_core.errors import WeightsError

    def broken(runtime, job_id, progress):  # type: ignore[no-untyped-def]
        raise RuntimeError("disk on fire") if transient else WeightsError("suspect.safetensors is empty")

    monkeypatch.setattr(runner, "_compute", broken)
    settings = test_settings(tmp_path, job_max_attempts=3)
    app = create_app(settings)
    with BackgroundServer(app) as server:
        api = Api(server.url, settings.admin_key_value())
        owner = api.account("owner")
        ref = api.register(owner, "m", weights=files.reference, spec=files.spec).json()
        job_id = api.submit(owner, ref["id"], files.suspect).json()["id"]
        done = api.wait(owner, job_id, timeout=60)
    assert done["status"] == "failed" and done["report"] is None
    kinds = [k for k, _ in _kinds(app, job_id)]
    if transient:
        assert done["attempts"] == 3
        assert done["error"] == {"code": "internal_error", "message": "RuntimeError: disk on fire"}
        assert kinds == ["verification.submitted"] + ["verification.started", "verification.retry"] * 2 + [
            "verification.started", "verification.failed"]
    else:
        assert done["attempts"] == 1
        assert done["error"]["code"] == "bad_weights"
        assert kinds == ["verification.submitted", "verification.started", "verification.failed"]
