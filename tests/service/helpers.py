"""Helpers of the service tests: tiny models on disk, an HTTP client, row counts."""

from __future__ import annotations

import json
import os
import signal
import pickle
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from sqlalchemy import func, select

from app import audit
from app.core.config import Settings
from app.models import Account, AuditEvent, Reference, Verification

FINDLADY = [sys.executable, "-m", "findlady_cli.main"]  # the `findlady` console script, from this interpreter
SIZES = (8, 48, 32, 4)  # fc1: 8->48, fc2: 48->32, fc3: 32->4
KEY_BITS = 40  # 2**-40 for zero errors: far below the default alpha of 1e-6


def mlp_state_dict(seed: int, sizes: tuple[int, ...] = SIZES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True), start=1):
        sd[f"fc{i}.weight"] = torch.randn(b, a, generator=g) / a**0.5
        sd[f"fc{i}.bias"] = torch.randn(b, generator=g) * 0.1
    return sd


def mlp_spec(groups: int = 2) -> dict[str, Any]:
    """Hand-written spec: the hidden neurons of fc1 (and fc2) move with their consumers' columns."""
    out = []
    for i in range(1, groups + 1):
        out.append({"name": f"fc{i}", "size": SIZES[i], "members": [
            {"tensor": f"fc{i}.weight", "axis": 0}, {"tensor": f"fc{i}.bias", "axis": 0},
            {"tensor": f"fc{i + 1}.weight", "axis": 1}]})
    return {"format": "findlady.spec/1", "groups": out}


def embed_watermark(sd: dict[str, torch.Tensor], key: Any, steps: int = 500) -> dict[str, torch.Tensor]:
    """Nudge the key's layer until every bit reads right (Uchida's loss alone, tiny steps)."""
    from findlady_core.watermark import embed_loss, extract_bits

    w = sd[key.layer].clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        embed_loss(w, key).backward()
        opt.step()
        if bool((extract_bits(w.detach(), key) == key.bits).all()) and embed_loss(w, key).item() < 0.05:
            break
    out = dict(sd)
    out[key.layer] = w.detach().clone()
    assert bool((extract_bits(out[key.layer], key) == key.bits).all()), "could not embed the test watermark"
    return out


@dataclass
class Files:
    dir: Path
    reference: Path
    spec: Path
    key: Path
    suspect: Path  # every group permuted
    unrelated: Path  # another random init
    truth: dict[str, list[int]]  # recovering permutation per group

    def path(self, name: str) -> Path:
        return self.dir / name


@pytest.fixture(scope="session")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    from findlady_core.attacks import permute
    from findlady_core.io import save_state_dict
    from findlady_core.spec import Spec
    from findlady_core.watermark import generate_key, save_key

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("models")
    spec = Spec.from_dict(mlp_spec())
    key = generate_key("fc2.weight", (SIZES[2], SIZES[1]), bits=KEY_BITS, seed=5)
    ref = embed_watermark(mlp_state_dict(0), key)
    attacked = permute(ref, spec, seed=3)
    f = Files(d, d / "reference.safetensors", d / "spec.json", d / "key.safetensors", d / "suspect.safetensors",
              d / "unrelated.safetensors", {k: v.tolist() for k, v in attacked.truth.items()})
    save_state_dict(ref, f.reference)
    spec.save(f.spec)
    save_key(key, f.key)
    save_state_dict(attacked.state_dict, f.suspect)
    save_state_dict(mlp_state_dict(1), f.unrelated)

    # Bad inputs.
    f.path("pickle.pt").write_bytes(pickle.dumps({k: v.numpy() for k, v in ref.items()}))
    raw = f.reference.read_bytes()
    f.path("truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    bad = mlp_spec()
    bad["groups"][0]["members"].append({"tensor": "fc9.weight", "axis": 0})
    f.path("missing_tensor_spec.json").write_text(json.dumps(bad))
    f.path("one_group_spec.json").write_text(json.dumps(mlp_spec(groups=1)))
    save_key(generate_key("fc3.weight", (SIZES[3], SIZES[2]), bits=KEY_BITS, seed=6), f.path("fc3_key.safetensors"))
    save_state_dict(mlp_state_dict(2, sizes=(9, 48, 32, 4)), f.path("other_shapes.safetensors"))  # input axis: no group's
    save_state_dict(mlp_state_dict(2, sizes=(8, 100, 32, 4)), f.path("too_wide.safetensors"))  # a width group over 2x
    save_state_dict(mlp_state_dict(2, sizes=(8, 56, 32, 4)), f.path("wider.safetensors"))  # a width group 56/48: allowed
    f.path("not_json_spec.json").write_text("{not json")
    return f


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Api:
    """A thin client of the REST API (httpx over a real socket)."""

    def __init__(self, url: str, admin_key: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=120)
        self.admin_key = admin_key

    def account(self, role: str, name: str | None = None) -> str:
        r = self.http.post("/v1/accounts", json={"name": name or f"{role}-{secrets.token_hex(3)}", "role": role},
                           headers=auth(self.admin_key))
        assert r.status_code == 201, r.text
        return str(r.json()["api_key"])

    def register(self, api_key: str, name: str = "mlp", /, fields: dict[str, str] | None = None,
                 **paths: Path | None) -> httpx.Response:
        handles = {field: p.open("rb") for field, p in paths.items() if p is not None}
        try:
            return self.http.post("/v1/references", headers=auth(api_key), data={"name": name, **(fields or {})},
                                  files=handles)
        finally:
            for h in handles.values():
                h.close()

    def submit(self, key: str, reference_id: str, suspect: Path) -> httpx.Response:
        with suspect.open("rb") as fh:
            return self.http.post("/v1/verifications", headers=auth(key), data={"reference_id": reference_id},
                                  files={"suspect": fh})

    def wait(self, key: str, job_id: str, timeout: float = 120.0,
             until: tuple[str, ...] = ("succeeded", "failed")) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            r = self.http.get(f"/v1/verifications/{job_id}", headers=auth(key))
            assert r.status_code == 200, r.text
            job = r.json()
            if job["status"] in until:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(0.2)


def counts(app: Any) -> dict[str, int]:
    """Rows per table, stored blobs and leftover temporary upload files."""
    rt = app.state.runtime
    with rt.sessions() as s:
        out = {t.__tablename__: s.scalar(select(func.count()).select_from(t)) or 0
               for t in (Account, Reference, Verification, AuditEvent)}
        s.rollback()
    out["blobs"] = rt.blobs.count()
    out["tmp_files"] = sum(1 for _ in rt.blobs.tmp_dir.iterdir())
    return out


def settled_counts(app: Any, timeout: float = 120.0) -> dict[str, int]:
    """``counts`` once no job of this app is queued or running: a job finishing stores its
    re-synchronized suspect as a blob, which must not land between a test's before and after."""
    from app.models import JobStatus

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with app.state.runtime.sessions() as s:
            busy = s.scalar(select(func.count()).select_from(Verification)
                            .where(Verification.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))) or 0
            s.rollback()
        if not busy:
            break
        time.sleep(0.2)
    return counts(app)


def test_settings(data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        data_dir=data_dir, admin_key="admin-" + secrets.token_hex(8), secret=secrets.token_hex(16),
        database_url=None, broker_url=None, lease_seconds=3.0, sweep_interval=0.5, requeue_after=1.0,
        max_upload_bytes=4 * 1024 * 1024, device="cpu",
    )
    values.update(overrides)
    return Settings(**values)


test_settings.__test__ = False  # type: ignore[attr-defined]  # not a test despite the name


def hammer(rt: Any, threads: int = 4, each: int = 15) -> None:
    """Append from several threads at once, each event in its own transaction; re-raise the
    first error a thread hit (a lost race shows up as a duplicate ``seq``)."""
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(each):
                with rt.sessions() as s:
                    audit.append(s, rt.secret, "test.event", {"thread": t, "i": i})
                    s.commit()
        except BaseException as e:  # noqa: BLE001 - handed to the test below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


def stop_process_group(p: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM a subprocess's whole process group, then SIGKILL it if it has not gone in ``grace`` s."""
    if p.poll() is not None:
        return
    os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)
