"""`findlady serve` as a user starts it: a subprocess on the embedded default."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from app.server import free_port

from .helpers import FINDLADY

ROOT = Path(__file__).resolve().parents[2]


def test_serve_starts_migrates_generates_secrets_and_stops(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINDLADY_")}
    proc = subprocess.Popen([*FINDLADY, "serve", "--port", str(port), "--data-dir", str(tmp_path)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode() if proc.stdout else ""
            time.sleep(0.2)
        admin = (tmp_path / "admin.key").read_text().strip()
        assert (tmp_path / "admin.key").stat().st_mode & 0o077 == 0  # not readable by others
        assert (tmp_path / "secret.key").stat().st_mode & 0o077 == 0
        r = httpx.post(f"http://127.0.0.1:{port}/v1/accounts", json={"name": "o", "role": "owner"},
                       headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 201
        assert (tmp_path / "findlady.db").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
    # uvicorn shuts down gracefully, then re-raises the signal it caught
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out
    assert "admin key was generated" in out and admin not in out  # says where, never prints it
