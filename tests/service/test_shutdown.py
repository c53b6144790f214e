"""Clean shutdown: SIGTERM with a job running hands it back; after a restart it finishes once.

`findlady serve` (embedded default, in-process worker) as a user runs it: SIGTERM mid-job, the
process exits in seconds (not after the job), the job is back in the queue with its attempt
not counted, and the restarted server runs it to the end. A running job reports its phase.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from app.server import free_port

from .helpers import FINDLADY, Api, Files, auth

ROOT = Path(__file__).resolve().parents[2]
DELAY = "60"  # the job sits in the core's resync phase this long: far longer than any shutdown may take


@contextmanager
def serve(data_dir: Path, log_name: str, **env: str) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("FINDLADY_")}
    full = {**base, "FINDLADY_DEVICE": "cpu", "FINDLADY_LEASE_SECONDS": "30", "OMP_NUM_THREADS": "1", **env}
    log = data_dir / log_name
    with log.open("wb") as out:
        proc = subprocess.Popen([*FINDLADY, "serve", "--port", str(port), "--data-dir", str(data_dir)],
                                cwd=ROOT, env=full, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "findlady serve did not start:\n" + log.read_text()[-3000:]
            time.sleep(0.2)
        yield proc, url, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def wait_phase(api: Api, key: str, job_id: str, phase: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = api.http.get(f"/v1/verifications/{job_id}", headers=auth(key)).json()
        if job["status"] == "running" and (job.get("progress") or {}).get("phase") == phase:
            return job
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.1)


def test_sigterm_mid_job_hands_it_back_and_the_restart_finishes_it_once(tmp_path: Path, files: Files) -> None:
    with serve(tmp_path, "serve1.log", FINDLADY_TEST_JOB_DELAY=DELAY) as (proc, url, log):
        api = Api(url, (tmp_path / "admin.key").read_text().strip())
        owner = api.account("owner")
        ref = api.register(owner, "m", weights=files.reference, spec=files.spec, key=files.key).json()
        job_id = api.submit(owner, ref["id"], files.suspect).json()["id"]

        running = wait_phase(api, owner, job_id, "resync")  # a running job says where it is
        progress = running["progress"]
        assert running["attempts"] == 1 and 0 <= progress["done"] < progress["total"]

        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        took = time.monotonic() - t0
        first = log.read_text()
    assert took < float(DELAY) / 2, f"shutdown waited for the job ({took:.0f} s)\n{first[-3000:]}"
    assert f"job {job_id}: attempt 1 handed back" in first
    assert "Application shutdown complete" in first
    assert "the admin key was generated" in first

    with serve(tmp_path, "serve2.log") as (proc, url, log):
        api = Api(url, (tmp_path / "admin.key").read_text().strip())
        done = api.wait(owner, job_id, timeout=60)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 1  # the handed-back attempt is not counted
        assert done["progress"] is None and done["report"]["verdict"] in ("match", "match_modified")
        trail = api.http.get(f"/v1/verifications/{job_id}/audit", headers=auth(owner)).json()
        assert trail["verified"]
        kinds = [e["kind"] for e in trail["events"]]
        assert kinds == ["verification.submitted", "verification.started", "verification.handed_back",
                         "verification.started", "verification.succeeded"]
        assert trail["events"][2]["payload"] == {"attempt": 1, "reason": "worker shutdown"}
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    second = log.read_text()
    assert "reusing the admin key stored" in second and "was generated" not in second


def test_drain_lets_the_running_job_finish_before_exiting(tmp_path: Path, files: Files) -> None:
    with serve(tmp_path, "serve.log", FINDLADY_TEST_JOB_DELAY="2", FINDLADY_DRAIN_SECONDS="60") as (proc, url, log):
        api = Api(url, (tmp_path / "admin.key").read_text().strip())
        owner = api.account("owner")
        ref = api.register(owner, "m", weights=files.reference, spec=files.spec).json()
        job_id = api.submit(owner, ref["id"], files.suspect).json()["id"]
        wait_phase(api, owner, job_id, "resync")
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        text = log.read_text()
    assert "waiting up to 60 s for running jobs" in text and f"job {job_id}: succeeded" in text, text[-3000:]
    assert "handed back" not in text
