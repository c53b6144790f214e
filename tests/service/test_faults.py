"""Faults against the real components: a job that kills its worker every time, Redis going
away, PostgreSQL restarting under a serving API, the API process killed with jobs queued.
(A worker SIGKILLed mid-job is ``test_services.test_worker_killed_mid_job_is_redelivered_and_finishes_once``.)

Nothing here touches the machine's shared Redis or PostgreSQL cluster: Redis faults use a
private redis-server on a free port; PostgreSQL faults a throwaway cluster under /tmp.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from app.main import create_app
from app.models import AuditEvent, Verification
from app.server import BackgroundServer, free_port

from .helpers import FINDLADY, Api, Files, auth, counts, settled_counts, stop_process_group, test_settings
from .test_services import pg_url  # noqa: F401  (fixture: a fresh PostgreSQL database)

pytestmark = [pytest.mark.services, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)


def _wait(pred: Any, timeout: float, what: str, step: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


# ---------------------------------------------------------------- private Redis


class PrivateRedis:
    """A redis-server of our own on a free loopback port (no persistence)."""

    def __init__(self) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--daemonize", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(self.ping, 20, "redis-server to answer")

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    r = PrivateRedis()
    r.start()
    try:
        yield r
    finally:
        r.stop()


@contextmanager
def celery_stack(tmp: Path, db_url: str, broker_url: str, *, crash: bool = False,
                 **overrides: Any) -> Iterator[tuple[Any, Api, subprocess.Popen[bytes], Path]]:
    """The API in this process (Celery publisher + sweeper) and a `findlady worker` subprocess.
    ``crash``: the worker's job code calls ``os._exit`` (the pool process dies every attempt)."""
    queue = f"findlady-test-{secrets.token_hex(4)}"
    settings = test_settings(tmp, database_url=db_url, broker_url=broker_url, queue_name=queue, lease_seconds=2.0,
                             **overrides)
    app = create_app(settings)
    env = {**os.environ, "FINDLADY_DATABASE_URL": db_url, "FINDLADY_BROKER_URL": broker_url, "FINDLADY_QUEUE_NAME": queue,
           "FINDLADY_DATA_DIR": str(tmp), "FINDLADY_SECRET": settings.secret_bytes().decode(),
           "FINDLADY_ADMIN_KEY": settings.admin_key_value(), "FINDLADY_LEASE_SECONDS": "2", "FINDLADY_DEVICE": "cpu",
           "FINDLADY_JOB_MAX_ATTEMPTS": str(settings.job_max_attempts),
           "FINDLADY_JOB_HARD_TIME_LIMIT": "120", "FINDLADY_JOB_SOFT_TIME_LIMIT": "100", "OMP_NUM_THREADS": "1"}
    argv = ["worker", "--pool", "prefork", "--concurrency", "1", "--loglevel", "INFO", "--hostname", f"{queue}@%h"]
    prelude = ("import os, app.jobs.runner as v\n"
               "v._compute = lambda *args, **kwargs: os._exit(13)\n") if crash else ""
    code = prelude + f"from findlady_cli.main import main\nraise SystemExit(main({argv!r}))\n"
    log_path = tmp / "worker.log"
    with BackgroundServer(app) as server, log_path.open("wb") as log:
        worker = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait(lambda: b" ready." in log_path.read_bytes() or worker.poll() is not None, 90, "the celery worker")
            assert worker.poll() is None, log_path.read_text()[-3000:]
            yield app, Api(server.url, settings.admin_key_value()), worker, log_path
        finally:
            stop_process_group(worker, 15)


def _events(app: Any, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    with app.state.runtime.sessions() as s:
        return [(e.kind, e.payload) for e in
                s.scalars(select(AuditEvent).where(AuditEvent.job_id == job_id).order_by(AuditEvent.seq))]


# ---------------------------------------------------------------- the faults


def test_job_that_always_kills_its_worker_fails_after_max_attempts(tmp_path: Path, pg_url: str,
                                                                   private_redis: PrivateRedis, files: Files) -> None:
    """Each attempt kills the pool process (os._exit). Celery redelivers (acks_late,
    reject_on_worker_lost); each delivery waits out the dead attempt's lease and takes over,
    counting the attempt; after job_max_attempts the job is failed with the reason, and stays so."""
    with celery_stack(tmp_path, pg_url, private_redis.url, crash=True, job_max_attempts=3) as (app, api, worker, log):
        owner = api.account("owner")
        ref = api.register(owner, "crashy", weights=files.reference, spec=files.spec).json()
        job = api.submit(owner, ref["id"], files.suspect).json()
        done = api.wait(owner, job["id"], timeout=120)
        assert done["status"] == "failed", (done, log.read_text()[-3000:])
        assert done["attempts"] == 3
        assert done["error"]["code"] == "worker_lost" and "3 attempts" in done["error"]["message"]
        assert done["report"] is None
        time.sleep(5)  # more than two leases: nothing runs it again
        again = api.wait(owner, job["id"])
        assert again["attempts"] == 3 and again["status"] == "failed"
        kinds = [k for k, _ in _events(app, job["id"])]
        assert kinds == ["verification.submitted"] + ["verification.started"] * 3 + ["verification.failed"]
        assert worker.poll() is None  # the worker survives its pool processes dying
        assert log.read_bytes().count(b"exited with 'exitcode 13'") >= 3


def test_redis_down_submission_is_kept_and_sent_when_redis_returns(tmp_path: Path, pg_url: str,
                                                                   private_redis: PrivateRedis, files: Files) -> None:
    """With the broker down a submission is still accepted (202): the job row and the suspect
    blob are committed first, the enqueue fails and is logged, /readyz says 503. When Redis is
    back the sweeper sends the job and it finishes once."""
    with celery_stack(tmp_path, pg_url, private_redis.url, requeue_after=1.0, sweep_interval=0.5) as (app, api, _w, log):
        owner = api.account("owner")
        ref = api.register(owner, "m", weights=files.reference, spec=files.spec, key=files.key).json()
        private_redis.stop()
        assert api.http.get("/readyz").status_code == 503
        before = settled_counts(app)
        t0 = time.monotonic()
        r = api.submit(owner, ref["id"], files.suspect)
        took = time.monotonic() - t0
        assert r.status_code == 202, r.text
        assert took < 15, f"the submission hung {took:.1f} s on the dead broker"
        job_id = r.json()["id"]
        after = counts(app)
        assert after["verifications"] == before["verifications"] + 1  # kept ...
        assert after["blobs"] == before["blobs"] + 1  # ... with its suspect
        time.sleep(2)  # several sweeps fail against the dead broker
        assert api.wait(owner, job_id, until=("queued", "running", "succeeded", "failed"))["status"] == "queued"

        private_redis.start()
        done = api.wait(owner, job_id, timeout=90)
        assert done["status"] == "succeeded", (done, log.read_text()[-3000:])
        assert done["attempts"] == 1 and done["report"]["watermark"]["bit_errors"] == 0
        kinds = [k for k, _ in _events(app, job_id)]
        assert kinds == ["verification.submitted", "verification.started", "verification.succeeded"]
        assert _wait(lambda: api.http.get("/readyz").status_code == 200, 30, "/readyz to recover")


# ---------------------------------------------------------------- private PostgreSQL


class PrivateCluster:
    """A throwaway PostgreSQL cluster under /tmp (run as the postgres user), stoppable at will."""

    def __init__(self) -> None:
        if PG_BIN is None or not (PG_BIN / "initdb").exists():
            pytest.skip("PostgreSQL server binaries not found")
        self.dir = Path(tempfile.mkdtemp(prefix="findlady-pg-"))
        self.port = free_port()
        self.data = self.dir / "data"
        self.as_postgres = [] if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--"]
        if self.as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run([str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"])
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, argv: list[str]) -> None:
        out = subprocess.run(self.as_postgres + argv, capture_output=True, timeout=120)
        assert out.returncode == 0, out.stdout.decode()[-2000:] + out.stderr.decode()[-2000:]

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c shared_buffers=16MB"
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "start"])

    def stop(self) -> None:
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def destroy(self) -> None:
        subprocess.run(self.as_postgres + [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_pg() -> Iterator[PrivateCluster]:
    c = PrivateCluster()
    try:
        c.start()
        yield c
    finally:
        c.destroy()


def test_postgres_restart_gives_503_then_recovers(tmp_path: Path, private_pg: PrivateCluster, files: Files) -> None:
    """PostgreSQL stops under a serving API: requests get 503 with Retry-After (never 500) and
    write nothing; when it is back the same API process serves again and jobs run."""
    settings = test_settings(tmp_path, database_url=private_pg.url)
    app = create_app(settings)
    with BackgroundServer(app) as server:
        api = Api(server.url, settings.admin_key_value())
        owner = api.account("owner")
        ref = api.register(owner, "m", weights=files.reference, spec=files.spec).json()
        first = api.wait(owner, api.submit(owner, ref["id"], files.suspect).json()["id"])
        assert first["status"] == "succeeded"
        blobs_before = app.state.runtime.blobs.count()

        private_pg.stop()
        gap = [
            api.http.get(f"/v1/verifications/{first['id']}", headers=auth(owner)),
            api.http.get("/v1/references", headers=auth(owner)),
            api.http.post("/v1/accounts", json={"name": "x", "role": "owner"}, headers=auth(api.admin_key)),
            api.submit(owner, ref["id"], files.unrelated),
        ]
        for r in gap:
            assert r.status_code == 503, (r.request.url, r.status_code, r.text)
            assert int(r.headers["retry-after"]) > 0 and r.json()["detail"]["code"] == "database_unavailable"
            assert "127.0.0.1" not in r.text and "postgres" not in r.text.lower()  # no connection details
        ready = api.http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("down")
        assert app.state.runtime.blobs.count() == blobs_before  # the refused submission stored nothing

        private_pg.start()
        seen: list[int] = []

        def served() -> bool:
            r = api.http.get(f"/v1/verifications/{first['id']}", headers=auth(owner))
            seen.append(r.status_code)
            return r.status_code == 200

        _wait(served, 30, "the API to serve again", step=0.5)
        assert set(seen) <= {200, 503}
        with app.state.runtime.sessions() as s:  # nothing half-written in the gap
            assert s.scalar(select(func.count()).select_from(Verification)) == 1
        second = api.submit(owner, ref["id"], files.unrelated)
        assert second.status_code == 202, second.text
        assert api.wait(owner, second.json()["id"])["status"] == "succeeded"
        assert api.http.get("/readyz").status_code == 200


# ---------------------------------------------------------------- API process restart


def test_api_killed_with_jobs_queued_they_complete_after_restart(tmp_path: Path, files: Files) -> None:
    """`findlady serve` (embedded default: the queue lives in the process) is SIGKILLed with
    one job running and others queued; after a restart on the same data folder every job
    finishes exactly once (queued jobs are taken back at start, the running one once its lease
    expires)."""
    port = free_port()
    admin = "admin-" + secrets.token_hex(8)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FINDLADY_")},
           "FINDLADY_ADMIN_KEY": admin, "FINDLADY_SECRET": secrets.token_hex(16), "FINDLADY_LEASE_SECONDS": "2",
           "FINDLADY_SWEEP_INTERVAL": "0.5", "FINDLADY_REQUEUE_AFTER": "1", "FINDLADY_DEVICE": "cpu",
           "FINDLADY_TEST_JOB_DELAY": "3", "OMP_NUM_THREADS": "1"}

    def serve(log_name: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([*FINDLADY, "serve", "--port", str(port), "--data-dir", str(tmp_path)],
                                cwd=ROOT, env=env, stdout=(tmp_path / log_name).open("wb"), stderr=subprocess.STDOUT)

        def up() -> bool:
            assert proc.poll() is None, (tmp_path / log_name).read_text()[-3000:]
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        _wait(up, 60, "findlady serve")
        return proc

    proc = serve("serve1.log")
    try:
        api = Api(f"http://127.0.0.1:{port}", admin)
        owner = api.account("owner")
        ref = api.register(owner, "m", weights=files.reference, spec=files.spec).json()
        jobs = [api.submit(owner, ref["id"], f).json()["id"] for f in (files.suspect, files.unrelated, files.suspect)]
        api.wait(owner, jobs[0], timeout=30, until=("running",))
        states = [api.wait(owner, j, until=("queued", "running", "succeeded", "failed"))["status"] for j in jobs]
        assert states == ["running", "queued", "queued"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

        proc = serve("serve2.log")
        api = Api(f"http://127.0.0.1:{port}", admin)
        done = [api.wait(owner, j, timeout=90) for j in jobs]
        assert [d["status"] for d in done] == ["succeeded"] * 3, done
        assert [d["attempts"] for d in done] == [2, 1, 1]  # the killed attempt counts
        for j in jobs:
            trail = api.http.get(f"/v1/verifications/{j}/audit", headers=auth(owner)).json()
            assert trail["verified"]
            assert [e["kind"] for e in trail["events"]].count("verification.succeeded") == 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


# ---------------------------------------------------------------- load smoke run


def test_load_quick() -> None:
    """`python -m benchmarks.load --quick` in CI: 24 submissions from 6 clients against uvicorn,
    2 Celery processes, PostgreSQL and a private Redis; all succeed, none lost or run twice."""
    import json

    import psycopg

    pg_admin = os.environ.get("FINDLADY_LOAD_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")
    try:
        psycopg.connect(pg_admin, connect_timeout=3).close()
    except psycopg.Error:
        if os.environ.get("FINDLADY_REQUIRE_SERVICES") == "1":
            pytest.fail("PostgreSQL is not reachable and FINDLADY_REQUIRE_SERVICES=1")
        pytest.skip("PostgreSQL is not reachable")
    out = subprocess.run([sys.executable, "-m", "benchmarks.load", "--quick", "--timeout", "180"], cwd=ROOT,
                         capture_output=True, timeout=230)
    assert out.returncode == 0, out.stdout.decode()[-3000:] + out.stderr.decode()[-3000:]
    result = json.loads(out.stdout)
    assert (result["accepted"], result["succeeded"], result["lost"], result["finished_twice_or_unverified"]) == (24, 24, 0, 0)
    assert result["audit_chain"]["intact"] and result["peak_rss_mib"]["api"] > 0
