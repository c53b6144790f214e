"""The service at real sizes (``python -m benchmarks.scale --service``).

Starts ``findlady serve`` on the embedded default (SQLite, in-process worker) in a fresh data
folder and measures, one run each:

* the API's RSS (``VmRSS``, sampled every 20 ms) while it receives a ~1 GB upload (the
  BERT-large reference of ``benchmarks.scale``, registered as a reference), and afterwards while
  it validates it, before answering;
* a BERT-base reference (438 MB, above ``FINDLADY_PREPARE_SYNC_BYTES``): registration answer,
  then the background null until the reference reads ``ready``;
* a BERT-base verification job, submit to ``succeeded``, and its report's timings.

Results are printed and merged into ``WORK/rows.json`` under ``"service"``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.scale import FINDLADY, ROOT, make


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler:
    """Peak RSS of a process, sampled in a thread; ``mark`` starts a new phase."""

    def __init__(self, pid: int) -> None:
        self.pid, self.phase, self.peaks = pid, "idle", {"idle": 0}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    def mark(self, phase: str) -> None:
        self.phase = phase
        self.peaks.setdefault(phase, 0)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peaks[self.phase] = max(self.peaks[self.phase], _rss(self.pid))
            except (FileNotFoundError, ProcessLookupError):
                return


def _upload(path: Path, sampler: Sampler, chunk: int = 1 << 20):  # type: ignore[no-untyped-def]
    """The file as a body stream; the sampler switches to 'validating' after the last byte."""
    with path.open("rb") as f:
        while block := f.read(chunk):
            yield block
    sampler.mark("validating")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    args = ap.parse_args(argv)
    base, large = make("bert-base", args.work), make("bert-large", args.work)
    data = args.work / f"service-{secrets.token_hex(4)}"
    admin = "fladmin_" + secrets.token_hex(16)
    port = _free_port()
    env = dict(os.environ, FINDLADY_ADMIN_KEY=admin, FINDLADY_SECRET=secrets.token_hex(32),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    api = subprocess.Popen([*FINDLADY, "serve", "--port", str(port), "--data-dir", str(data)], env=env, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=open(args.work / "service.log", "wb"))
    url = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    try:
        http = httpx.Client(base_url=url, timeout=600)
        for _ in range(600):
            try:
                if http.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        owner = http.post("/v1/accounts", json={"name": "owner", "role": "owner"},
                          headers={"Authorization": f"Bearer {admin}"}).json()["api_key"]
        auth = {"Authorization": f"Bearer {owner}"}

        # 1. the API's memory while it receives a large upload (multipart, streamed)
        with Sampler(api.pid) as s:
            time.sleep(0.5)
            idle = s.peaks["idle"]
            s.mark("receiving")
            boundary = "findlady" + secrets.token_hex(8)
            head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nbert-large\r\n"
                    f"--{boundary}\r\nContent-Disposition: form-data; name=\"spec\"; filename=\"spec.json\"\r\n\r\n"
                    ).encode() + large["spec"].read_bytes() + (
                    f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"weights\"; filename=\"w\"\r\n\r\n").encode()
            tail = f"\r\n--{boundary}--\r\n".encode()

            def body():  # type: ignore[no-untyped-def]
                yield head
                yield from _upload(large["ref"], s)
                yield tail

            t0 = time.perf_counter()
            r = http.post("/v1/references", content=body(), headers={
                **auth, "Content-Type": f"multipart/form-data; boundary={boundary}"})
            upload_s = time.perf_counter() - t0
        assert r.status_code == 201, r.text
        out["upload"] = {"bytes": large["ref"].stat().st_size, "seconds": upload_s, "rss_idle": idle,
                         "rss_receiving": s.peaks["receiving"], "rss_validating": s.peaks.get("validating", 0),
                         "status": r.json()["status"]}
        print(f"upload {out['upload']['bytes'] / 1e9:.2f} GB in {upload_s:.1f} s: API RSS idle {idle / 1e6:.0f} MB, "
              f"receiving {s.peaks['receiving'] / 1e6:.0f} MB, validating {s.peaks.get('validating', 0) / 1e6:.0f} MB",
              file=sys.stderr)
        large_id = r.json()["id"]

        # 2. BERT-base: registration, background null, then one job
        t0 = time.perf_counter()
        with base["ref"].open("rb") as w, base["spec"].open("rb") as sp:
            r = http.post("/v1/references", headers=auth, data={"name": "bert-base"}, files={"weights": w, "spec": sp})
        assert r.status_code == 201, r.text
        register_s = time.perf_counter() - t0
        ref_id = r.json()["id"]
        status = r.json()["status"]
        while status == "preparing":  # the preparer works in order: BERT-large's null comes first
            time.sleep(1)
            status = http.get(f"/v1/references/{ref_id}", headers=auth).json()["status"]
        ready_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with base["sus"].open("rb") as f:
            r = http.post("/v1/verifications", headers=auth, data={"reference_id": ref_id}, files={"suspect": f})
        assert r.status_code == 202, r.text
        job = r.json()
        while job["status"] not in ("succeeded", "failed"):
            time.sleep(0.5)
            job = http.get(f"/v1/verifications/{job['id']}", headers=auth).json()
        job_s = time.perf_counter() - t0
        rep = job.get("report") or {}
        out["bert_base"] = {"register_s": register_s, "ready_s": ready_s, "status": status, "job_s": job_s,
                            "job_status": job["status"], "verdict": rep.get("verdict"), "timings": rep.get("timings"),
                            "error": job.get("error")}
        print(f"bert-base: registered in {register_s:.1f} s, {status} after {ready_s:.1f} s (after BERT-large's null); "
              f"job {job['status']} in {job_s:.1f} s ({rep.get('verdict')}), timings {rep.get('timings')}",
              file=sys.stderr)
        out["bert_large_status"] = http.get(f"/v1/references/{large_id}", headers=auth).json()["status"]
    finally:
        api.terminate()
        api.wait(timeout=60)
    store = args.work / "rows.json"
    rows = json.loads(store.read_text()) if store.exists() else {}
    rows["service"] = out
    store.write_text(json.dumps(rows, indent=1))
    print(json.dumps(out, indent=1))
    return 0
