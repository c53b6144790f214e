"""Load: N verification submissions from C concurrent clients against the production stack.

    python -m benchmarks.load [--quick] [--n N] [--clients C] [--worker-processes W] [--out FILE]

Starts everything itself, on loopback only: a fresh database on the local PostgreSQL
(``FINDLADY_LOAD_PG_ADMIN_URL``, default ``postgresql://postgres@127.0.0.1:5432/test``, dropped
afterwards), a private redis-server on a free port, ``findlady serve`` (uvicorn) and one
``findlady worker`` with W prefork processes (default 2). Models are tiny MLPs (8-48-32-4) with a
40-bit watermark; every suspect is a differently permuted copy, so every upload is a new blob.

Measures: submissions accepted per second, time to drain the queue, p50/p95/p99 latency of
status polls while the workers are busy, peak RSS of the API and of each worker process.
Checks (exit 1 if any fails): every job ``succeeded`` with a report, none lost, none finished
twice (exactly one ``verification.succeeded`` audit event per job), the audit chain intact.
Full mode: 200 submissions, 20 clients. ``--quick`` (CI): 24 submissions, 6 clients.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
SIZES = (8, 48, 32, 4)
FINDLADY = [sys.executable, "-m", "findlady_cli.main"]  # the `findlady` command (no import of the service here)
PG_ADMIN_URL = os.environ.get("FINDLADY_LOAD_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")


# ---------------------------------------------------------------- models


def _mlp(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True), start=1):
        sd[f"fc{i}.weight"] = torch.randn(b, a, generator=g) / a**0.5
        sd[f"fc{i}.bias"] = torch.randn(b, generator=g) * 0.1
    return sd


def _spec_dict() -> dict[str, Any]:
    groups = [{"name": f"fc{i}", "size": SIZES[i], "members": [
        {"tensor": f"fc{i}.weight", "axis": 0}, {"tensor": f"fc{i}.bias", "axis": 0},
        {"tensor": f"fc{i + 1}.weight", "axis": 1}]} for i in (1, 2)]
    return {"format": "findlady.spec/1", "groups": groups}


def make_models(d: Path, n: int) -> tuple[Path, Path, Path, list[Path]]:
    """Reference (watermarked), spec, key and ``n`` permuted suspects under ``d``."""
    from findlady_core.attacks import permute
    from findlady_core.io import save_state_dict
    from findlady_core.spec import Spec
    from findlady_core.watermark import embed_loss, extract_bits, generate_key, save_key

    spec = Spec.from_dict(_spec_dict())
    key = generate_key("fc2.weight", (SIZES[2], SIZES[1]), bits=40, seed=5)
    ref = _mlp(0)
    w = ref["fc2.weight"].clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=1e-2)
    for _ in range(500):  # embed the watermark (Uchida's loss alone)
        opt.zero_grad()
        embed_loss(w, key).backward()
        opt.step()
        if bool((extract_bits(w.detach(), key) == key.bits).all()) and embed_loss(w, key).item() < 0.05:
            break
    ref["fc2.weight"] = w.detach().clone()
    paths = (d / "reference.safetensors", d / "spec.json", d / "key.safetensors")
    save_state_dict(ref, paths[0])
    spec.save(paths[1])
    save_key(key, paths[2])
    suspects = []
    for i in range(n):
        p = d / f"suspect-{i}.safetensors"
        save_state_dict(permute(ref, spec, seed=1000 + i).state_dict, p)
        suspects.append(p)
    return (*paths, suspects)


# ---------------------------------------------------------------- infrastructure


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


@contextmanager
def postgres_database() -> Iterator[str]:
    import psycopg

    conn = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    name = f"findlady_load_{secrets.token_hex(4)}"
    conn.execute(f'CREATE DATABASE "{name}"')
    try:
        info = conn.info
        yield f"postgresql+psycopg://{info.user}@{info.host}:{info.port}/{name}"
    finally:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@contextmanager
def private_redis() -> Iterator[str]:
    import redis

    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed")
    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def up() -> bool:
            with suppress(redis.RedisError):
                return bool(redis.Redis(port=port, socket_connect_timeout=1).ping())
            return False

        _wait(up, 20, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
    return out


def _status_kib(pid: int, field: str) -> int:
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class MemorySampler:
    """Peak RSS per process (VmHWM, re-read every half second so exited processes still count)."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = roots
        self.peak_kib: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for label, pid in self.roots.items():
            procs = {label: pid} | {f"{label}/child-{i}": c for i, c in enumerate(sorted(_children(pid)))}
            for name, p in procs.items():
                self.peak_kib[name] = max(self.peak_kib.get(name, 0), _status_kib(p, "VmHWM"))

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    def __enter__(self) -> MemorySampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sample()


@contextmanager
def stack(data_dir: Path, db_url: str, broker_url: str, worker_processes: int) -> Iterator[dict[str, Any]]:
    port = _free_port()
    admin = "admin-" + secrets.token_hex(12)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FINDLADY_")},
           "FINDLADY_DATABASE_URL": db_url, "FINDLADY_BROKER_URL": broker_url, "FINDLADY_DATA_DIR": str(data_dir),
           "FINDLADY_SECRET": secrets.token_hex(32), "FINDLADY_ADMIN_KEY": admin, "FINDLADY_DEVICE": "cpu",
           "FINDLADY_QUEUE_NAME": f"findlady-load-{secrets.token_hex(3)}", "OMP_NUM_THREADS": "1",
           "FINDLADY_JOB_SOFT_TIME_LIMIT": "300", "FINDLADY_JOB_HARD_TIME_LIMIT": "360"}
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        api = subprocess.Popen([*FINDLADY, "serve", "--port", str(port), "--data-dir", str(data_dir)],
                               cwd=ROOT, env=env, stdout=(logs / "api.log").open("wb"), stderr=subprocess.STDOUT,
                               start_new_session=True)
        procs.append(api)
        url = f"http://127.0.0.1:{port}"

        def api_up() -> bool:
            if api.poll() is not None:
                raise RuntimeError("the API exited:\n" + (logs / "api.log").read_text()[-3000:])
            with suppress(httpx.TransportError):
                return httpx.get(url + "/readyz", timeout=2).status_code == 200
            return False

        _wait(api_up, 90, "the API")
        worker = subprocess.Popen([*FINDLADY, "worker", "--pool", "prefork", "--concurrency",
                                   str(worker_processes), "--loglevel", "WARNING", "--hostname", f"load-{port}@%h"],
                                  cwd=ROOT, env=env, stdout=(logs / "worker.log").open("wb"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        procs.append(worker)
        _wait(lambda: len(_children(worker.pid)) >= worker_processes or worker.poll() is not None, 90, "the workers")
        if worker.poll() is not None:
            raise RuntimeError("the worker exited:\n" + (logs / "worker.log").read_text()[-3000:])
        yield {"url": url, "admin": admin, "api_pid": api.pid, "worker_pid": worker.pid, "logs": logs}
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(10)


# ---------------------------------------------------------------- the load


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def run_load(url: str, admin: str, ref_files: tuple[Path, Path, Path], suspects: list[Path], clients: int,
             timeout: float) -> dict[str, Any]:
    """Register one reference, submit every suspect from ``clients`` threads, poll to the end."""
    h = {"Authorization": f"Bearer {admin}"}
    with httpx.Client(base_url=url, timeout=60) as c:
        owner = c.post("/v1/accounts", json={"name": "load-owner", "role": "owner"}, headers=h).json()["api_key"]
        auditors = [c.post("/v1/accounts", json={"name": f"load-auditor-{i}", "role": "auditor"}, headers=h)
                    .json()["api_key"] for i in range(clients)]
        with ref_files[0].open("rb") as w, ref_files[1].open("rb") as s, ref_files[2].open("rb") as k:
            r = c.post("/v1/references", data={"name": "load-mlp"}, files={"weights": w, "spec": s, "key": k},
                       headers={"Authorization": f"Bearer {owner}"})
        r.raise_for_status()
        ref_id = r.json()["id"]

    lock = threading.Lock()
    submit_lat: list[float] = []
    poll_lat: list[float] = []
    poll_busy_lat: list[float] = []  # polls answered while some job was still queued or running
    jobs: dict[str, str] = {}  # job id -> auditor key
    errors: list[str] = []
    final: dict[str, dict[str, Any]] = {}
    next_i = iter(range(len(suspects)))
    deadline = time.monotonic() + timeout
    t0 = time.perf_counter()
    submit_done: list[float] = []

    def client(i: int) -> None:
        key = auditors[i]
        hk = {"Authorization": f"Bearer {key}"}
        mine: list[str] = []
        with httpx.Client(base_url=url, timeout=60) as c:
            while True:
                with lock:
                    n = next(next_i, None)
                if n is None:
                    break
                t = time.perf_counter()
                with suspects[n].open("rb") as fh:
                    r = c.post("/v1/verifications", data={"reference_id": ref_id}, files={"suspect": fh}, headers=hk)
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code == 202:
                        submit_lat.append(dt)
                        jobs[r.json()["id"]] = key
                        mine.append(r.json()["id"])
                    else:
                        errors.append(f"submit {n}: {r.status_code} {r.text[:200]}")
            with lock:
                submit_done.append(time.perf_counter())
            pending = list(mine)
            while pending and time.monotonic() < deadline:
                for job_id in list(pending):
                    t = time.perf_counter()
                    r = c.get(f"/v1/verifications/{job_id}", headers=hk)
                    dt = time.perf_counter() - t
                    body = r.json() if r.status_code == 200 else {}
                    with lock:
                        poll_lat.append(dt)
                        if len(final) < len(jobs) or len(submit_done) < clients:
                            poll_busy_lat.append(dt)
                        if r.status_code != 200:
                            errors.append(f"poll {job_id}: {r.status_code}")
                        elif body["status"] in ("succeeded", "failed"):
                            final[job_id] = body
                            pending.remove(job_id)
                time.sleep(0.25)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t_end = time.perf_counter()
    submit_wall = max(submit_done) - t0 if submit_done else float("nan")

    # Integrity: states, attempts and the audit trail of every job.
    run_twice: list[str] = []
    attempts: list[int] = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for job_id, key in jobs.items():
            trail = c.get(f"/v1/verifications/{job_id}/audit", headers={"Authorization": f"Bearer {key}"}).json()
            kinds = [e["kind"] for e in trail["events"]]
            if kinds.count("verification.succeeded") != 1 or not trail["verified"]:
                run_twice.append(job_id)
        chain = c.get("/v1/audit/verify", headers=h).json()
    for body in final.values():
        attempts.append(int(body["attempts"]))
    succeeded = sum(1 for b in final.values() if b["status"] == "succeeded" and b["report"])
    verdicts: dict[str, int] = {}
    for b in final.values():
        v = (b.get("report") or {}).get("verdict", "none")
        verdicts[v] = verdicts.get(v, 0) + 1
    return {
        "submissions": len(suspects), "clients": clients, "accepted": len(jobs), "refused": len(errors),
        "submit_wall_s": submit_wall, "accepted_per_s": len(jobs) / submit_wall if submit_wall else float("nan"),
        "drain_s": t_end - t0, "drain_after_last_submit_s": t_end - max(submit_done) if submit_done else float("nan"),
        "jobs_per_s": len(final) / (t_end - t0),
        "submit_latency_s": {"p50": _pct(submit_lat, 50), "p95": _pct(submit_lat, 95), "p99": _pct(submit_lat, 99)},
        "poll_latency_busy_s": {"n": len(poll_busy_lat), "p50": _pct(poll_busy_lat, 50), "p95": _pct(poll_busy_lat, 95),
                                "p99": _pct(poll_busy_lat, 99), "max": max(poll_busy_lat, default=float("nan"))},
        "succeeded": succeeded, "lost": len(jobs) - len(final), "failed": len(final) - succeeded,
        "finished_twice_or_unverified": len(run_twice), "attempts_over_1": sum(1 for a in attempts if a > 1),
        "verdicts": verdicts, "audit_chain": chain, "errors": errors[:10],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI smoke run: 24 submissions, 6 clients")
    p.add_argument("--n", type=int, help="submissions (default 200; 24 with --quick)")
    p.add_argument("--clients", type=int, help="concurrent clients (default 20; 6 with --quick)")
    p.add_argument("--worker-processes", type=int, default=2, help="Celery prefork processes (default 2)")
    p.add_argument("--timeout", type=float, default=900, help="seconds before giving up on the drain")
    p.add_argument("--out", type=Path, help="also write the JSON result here")
    args = p.parse_args(argv)
    n = args.n or (24 if args.quick else 200)
    clients = args.clients or (6 if args.quick else 20)
    if not (1 <= n <= 10_000 and 1 <= clients <= 200):
        p.error("--n must be 1..10000 and --clients 1..200")
    torch.set_num_threads(1)

    work = Path(tempfile.mkdtemp(prefix="findlady-load-"))
    try:
        t = time.perf_counter()
        (work / "models").mkdir()
        ref, spec, key, suspects = make_models(work / "models", n)
        print(f"load: {n} suspects written in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        with postgres_database() as db_url, private_redis() as broker_url, \
                stack(work / "data", db_url, broker_url, args.worker_processes) as s:
            with MemorySampler({"api": s["api_pid"], "worker": s["worker_pid"]}) as mem:
                result = run_load(s["url"], s["admin"], (ref, spec, key), suspects, clients, args.timeout)
        result["peak_rss_mib"] = {k: round(v / 1024, 1) for k, v in sorted(mem.peak_kib.items())}
        result["worker_processes"] = args.worker_processes
        result["mode"] = "quick" if args.quick else "full"
        result["cpu_count"] = os.cpu_count()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    text = json.dumps(result, indent=2, default=float)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    lat = result["poll_latency_busy_s"]
    print(f"load: {result['accepted']}/{n} accepted at {result['accepted_per_s']:.1f}/s; drained in "
          f"{result['drain_s']:.1f} s; polls while busy p50/p95/p99 = {lat['p50'] * 1e3:.0f}/{lat['p95'] * 1e3:.0f}/"
          f"{lat['p99'] * 1e3:.0f} ms; lost {result['lost']}, failed {result['failed']}, finished twice "
          f"{result['finished_twice_or_unverified']}; chain intact {result['audit_chain'].get('intact')}",
          file=sys.stderr)
    ok = (result["accepted"] == n and result["succeeded"] == n and result["lost"] == 0
          and result["finished_twice_or_unverified"] == 0 and result["audit_chain"].get("intact") is True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
