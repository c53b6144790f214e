"""Clean shutdown of a real Celery worker (PostgreSQL, Redis, `findlady worker` subprocess).

SIGTERM goes to the worker's main process only, as `docker stop` or `kill PID` sends it: the
warm shutdown must not wait for the running job; the pool process hands it back (queued,
attempt not counted, audited, logged) and the task goes back to the broker, so a new worker
finishes it once, without waiting for a lease to expire.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from app.main import create_app
from app.server import BackgroundServer

from .helpers import FINDLADY, Api, Files, auth, stop_process_group, test_settings
from .test_services import pg_url, redis_url  # noqa: F401 - module fixtures: a fresh database, a Redis db
from .test_shutdown import wait_phase

pytestmark = [pytest.mark.services, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]


def start_worker(env: dict[str, str], log_path: Path, queue: str) -> subprocess.Popen[bytes]:
    """A `findlady worker`; its log (stderr) in ``log_path``, Celery's banner (stdout) beside it."""
    with log_path.open("wb") as log, log_path.with_suffix(".out").open("wb") as out:
        worker = subprocess.Popen(
            [*FINDLADY, "worker", "--pool", "prefork", "--concurrency", "1", "--loglevel", "INFO",
             "--hostname", f"{queue}-{secrets.token_hex(2)}@%h"],
            cwd=ROOT, env=env, stdout=out, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 90
    while b" ready." not in log_path.read_bytes():
        assert worker.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.2)
    return worker


def test_sigterm_to_a_celery_worker_hands_the_job_back(tmp_path: Path, pg_url: str, redis_url: str,  # noqa: F811
                                                       files: Files) -> None:
    queue = f"findlady-test-{secrets.token_hex(4)}"
    # A long lease: a job that were merely abandoned would wait it out; a handed-back one must not.
    settings = test_settings(tmp_path, database_url=pg_url, broker_url=redis_url, queue_name=queue,
                             lease_seconds=120.0)
    env = {**os.environ, "FINDLADY_DATABASE_URL": pg_url, "FINDLADY_BROKER_URL": redis_url,
           "FINDLADY_QUEUE_NAME": queue, "FINDLADY_DATA_DIR": str(tmp_path),
           "FINDLADY_SECRET": settings.secret_bytes().decode(), "FINDLADY_ADMIN_KEY": settings.admin_key_value(),
           "FINDLADY_LEASE_SECONDS": "120", "FINDLADY_DEVICE": "cpu", "OMP_NUM_THREADS": "1",
           "FINDLADY_JOB_HARD_TIME_LIMIT": "200", "FINDLADY_JOB_SOFT_TIME_LIMIT": "180"}
    with BackgroundServer(create_app(settings)) as server:
        api = Api(server.url, settings.admin_key_value())
        owner = api.account("owner")
        ref = api.register(owner, "m", weights=files.reference, spec=files.spec, key=files.key).json()
        job_id = api.submit(owner, ref["id"], files.suspect).json()["id"]

        first_log = tmp_path / "worker1.log"
        worker = start_worker({**env, "FINDLADY_TEST_JOB_DELAY": "100"}, first_log, queue)
        try:
            wait_phase(api, owner, job_id, "resync")
            t0 = time.monotonic()
            worker.send_signal(signal.SIGTERM)  # the main process only
            worker.wait(60)
            took = time.monotonic() - t0
        finally:
            stop_process_group(worker, 10)
        text = first_log.read_text()
        assert took < 30, f"the warm shutdown waited for the job ({took:.0f} s)\n{text[-3000:]}"
        assert f"job {job_id}: attempt 1 handed back" in text, text[-3000:]
        job = api.http.get(f"/v1/verifications/{job_id}", headers=auth(owner)).json()
        assert (job["status"], job["attempts"], job["progress"]) == ("queued", 0, None)

        second_log = tmp_path / "worker2.log"
        worker = start_worker({**env, "FINDLADY_LOG_FORMAT": "json"}, second_log, queue)
        try:
            t0 = time.monotonic()
            done = api.wait(owner, job_id, timeout=60)
            took = time.monotonic() - t0
        finally:
            stop_process_group(worker, 10)
        assert done["status"] == "succeeded", (done, second_log.read_text()[-3000:])
        assert took < 60 and done["attempts"] == 1  # not after the 120 s lease; the hand-back not counted
        trail = api.http.get(f"/v1/verifications/{job_id}/audit", headers=auth(owner)).json()
        assert trail["verified"]
        kinds = [e["kind"] for e in trail["events"]]
        assert kinds == ["verification.submitted", "verification.started", "verification.handed_back",
                         "verification.started", "verification.succeeded"]
        assert [e["payload"].get("takeover") for e in trail["events"] if e["kind"] == "verification.started"] == \
            [False, False]
    # The second worker logged in JSON: every line one object; the job's lines carry its id.
    lines = [json.loads(line) for line in second_log.read_text().splitlines() if line.strip()]
    assert all(set(doc) >= {"time", "level", "logger", "message", "job_id", "request_id"} for doc in lines)
    assert any(d["message"].endswith(" ready.") and d["logger"].startswith("celery") for d in lines)
    mine = [d["message"] for d in lines if d["job_id"] == job_id]
    assert f"job {job_id}: attempt 1 started" in mine and any("succeeded" in m for m in mine), mine
