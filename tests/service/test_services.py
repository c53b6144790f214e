"""Production components for real: PostgreSQL, Redis and a Celery worker process.

Each test module gets its own PostgreSQL database (created and dropped here), its own Redis
database number and queue name, so parallel runs do not collide. Without PostgreSQL or Redis
the tests are skipped, unless FINDLADY_REQUIRE_SERVICES=1 (set by .ci/run) makes that a failure.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DatabaseError

from app import audit
from app.main import create_app
from app.server import BackgroundServer
from report_schema import assert_valid

from .helpers import FINDLADY, Api, Files, auth, hammer, stop_process_group, test_settings

pytestmark = [pytest.mark.services, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URLS = [u for u in [os.environ.get("FINDLADY_TEST_PG_ADMIN_URL"),
                             "postgresql://postgres@127.0.0.1:5432/test",
                             "postgresql://root@127.0.0.1:5432/test"] if u]
REDIS_URL = os.environ.get("FINDLADY_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def _unavailable(what: str) -> None:
    if os.environ.get("FINDLADY_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{what} is not reachable and FINDLADY_REQUIRE_SERVICES=1")
    pytest.skip(f"{what} is not reachable (start it, or run .ci/run)")


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this module, dropped afterwards."""
    import psycopg

    conn = None
    for url in PG_ADMIN_URLS:
        try:
            conn = psycopg.connect(url, autocommit=True, connect_timeout=3)
            break
        except psycopg.OperationalError:
            continue
    if conn is None:
        _unavailable("PostgreSQL")
    assert conn is not None
    name = f"findlady_test_{secrets.token_hex(5)}"
    info = conn.info
    conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{info.user}@{info.host}:{info.port}/{name}"
    finally:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A Redis database number picked at random; this module's queues are deleted afterwards."""
    import redis

    url = f"{REDIS_URL.rstrip('/')}/{secrets.randbelow(15) + 1}"
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError:
        _unavailable("Redis")
    yield url
    for key in client.scan_iter("*findlady-test-*"):
        client.delete(key)
    client.close()


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


@contextmanager
def stack(tmp: Path, pg_url: str, redis_url: str, **worker_env: str) -> Iterator[tuple[Any, Api, subprocess.Popen[bytes], Any]]:
    """API in this process (Celery publisher + sweeper) and a `findlady worker` subprocess."""
    queue = f"findlady-test-{secrets.token_hex(4)}"
    settings = test_settings(tmp, database_url=pg_url, broker_url=redis_url, queue_name=queue, lease_seconds=2.0)
    app = create_app(settings)
    env = {**os.environ, "FINDLADY_DATABASE_URL": pg_url, "FINDLADY_BROKER_URL": redis_url,
           "FINDLADY_QUEUE_NAME": queue, "FINDLADY_DATA_DIR": str(tmp), "FINDLADY_SECRET": settings.secret_bytes().decode(),
           "FINDLADY_ADMIN_KEY": settings.admin_key_value(), "FINDLADY_LEASE_SECONDS": "2", "FINDLADY_DEVICE": "cpu",
           "FINDLADY_JOB_HARD_TIME_LIMIT": "120", "FINDLADY_JOB_SOFT_TIME_LIMIT": "100", "OMP_NUM_THREADS": "1",
           **worker_env}
    log_path = tmp / "worker.log"
    with BackgroundServer(app) as server, log_path.open("wb") as log:
        worker = subprocess.Popen(
            [*FINDLADY, "worker", "--pool", "prefork", "--concurrency", "1", "--loglevel", "INFO",
             "--hostname", f"{queue}@%h"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 90
            while b" ready." not in log_path.read_bytes():
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("celery worker did not start:\n" + log_path.read_text()[-3000:])
                time.sleep(0.2)
            yield app, Api(server.url, settings.admin_key_value()), worker, log_path
        finally:
            stop_process_group(worker, 10)


def _recompute(secret: bytes, e: dict[str, Any]) -> str:
    content = {k: e[k] for k in ("seq", "job_id", "kind", "payload", "created_at")}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hmac.new(secret, (e["prev_hash"] + canonical).encode(), hashlib.sha256).hexdigest()


def test_postgres_redis_celery_end_to_end(tmp_path: Path, pg_url: str, redis_url: str, files: Files) -> None:
    with stack(tmp_path, pg_url, redis_url) as (app, api, _worker, log_path):
        ready = api.http.get("/readyz")
        assert ready.status_code == 200, ready.text
        owner, auditor = api.account("owner"), api.account("auditor")
        ref = api.register(owner, "tiny-mlp", weights=files.reference, spec=files.spec, key=files.key)
        assert ref.status_code == 201, ref.text
        r = api.submit(auditor, ref.json()["id"], files.suspect)
        assert r.status_code == 202, r.text
        done = api.wait(auditor, r.json()["id"], timeout=120)
        assert done["status"] == "succeeded", (done, log_path.read_text()[-3000:])
        assert done["attempts"] == 1
        rep = done["report"]
        assert_valid(rep)  # written by a Celery worker process, outside the suite's in-process check
        assert rep["verdict"] in ("match", "match_modified")
        full = api.http.get(f"/v1/verifications/{done['id']}", params={"include": "permutations"}, headers=auth(auditor))
        assert {g["name"]: g["permutation"] for g in full.json()["report"]["resync"]["groups"]} == files.truth
        assert rep["watermark"]["bit_errors"] == 0 and rep["watermark"]["detected"]

        trail = api.http.get(f"/v1/verifications/{done['id']}/audit", headers=auth(owner)).json()
        assert [e["kind"] for e in trail["events"]] == ["verification.submitted", "verification.started",
                                                        "verification.succeeded"]
        assert trail["verified"]
        rt = app.state.runtime
        assert all(_recompute(rt.secret, e) == e["hash"] for e in trail["events"])
        hammer(rt)  # concurrent writers take turns on the advisory lock
        with rt.sessions() as s:
            intact, n = audit.verify_chain(s, rt.secret)
        assert intact and n >= 6 + 60
        # PostgreSQL refuses to rewrite history.
        with rt.engine.connect() as c:
            for sql in ("UPDATE audit_events SET kind = 'forged'", "DELETE FROM audit_events", "TRUNCATE audit_events"):
                with pytest.raises(DatabaseError, match="append-only"):
                    c.execute(text(sql))
                c.rollback()


def test_worker_killed_mid_job_is_redelivered_and_finishes_once(tmp_path: Path, pg_url: str, redis_url: str,
                                                                files: Files) -> None:
    """SIGKILL the pool process running the job: Celery requeues the task (acks_late,
    reject_on_worker_lost); the next delivery waits for the dead attempt's lease to expire,
    takes the job over and finishes it once."""
    with stack(tmp_path, pg_url, redis_url, FINDLADY_TEST_JOB_DELAY="4") as (_app, api, worker, log_path):
        owner = api.account("owner")
        ref = api.register(owner, "tiny-mlp", weights=files.reference, spec=files.spec, key=files.key).json()
        job = api.submit(owner, ref["id"], files.suspect).json()
        running = api.wait(owner, job["id"], timeout=60, until=("running", "succeeded", "failed"))
        assert running["status"] == "running" and running["attempts"] == 1
        pool = _children(worker.pid)
        assert len(pool) == 1, pool
        os.kill(pool[0], signal.SIGKILL)

        done = api.wait(owner, job["id"], timeout=90)
        assert done["status"] == "succeeded", (done, log_path.read_text()[-3000:])
        assert done["attempts"] == 2
        assert done["report"]["watermark"]["bit_errors"] == 0
        events = api.http.get(f"/v1/verifications/{job['id']}/audit", headers=auth(owner)).json()["events"]
        kinds = [e["kind"] for e in events]
        assert kinds.count("verification.succeeded") == 1 and "verification.failed" not in kinds
        started = [e["payload"] for e in events if e["kind"] == "verification.started"]
        assert started == [{"attempt": 1, "takeover": False}, {"attempt": 2, "takeover": True}]
        assert worker.poll() is None  # the worker itself survived and replaced its pool process
        assert b"SIGKILL" in log_path.read_bytes() or b"signal 9" in log_path.read_bytes()


def test_readyz_reports_a_dead_broker(tmp_path: Path) -> None:
    settings = test_settings(tmp_path, broker_url="redis://127.0.0.1:1/0")
    with BackgroundServer(create_app(settings)) as server:
        import httpx

        r = httpx.get(server.url + "/readyz", timeout=30)
    assert r.status_code == 503
    assert r.json()["checks"]["database"] == "ok" and r.json()["checks"]["broker"].startswith("down")
