"""``findlady demo``: the main job end to end, on the embedded default.

An owner trains a small CNN on MNIST-5k with a white-box watermark (Uchida) in ``conv2``,
traces its permutation spec and registers it over HTTP with the key. A thief's copy is made
from it: every neuron group permuted (which scrambles a naive watermark read-out), Gaussian
noise on every weight tensor, 8-bit quantization. An unrelated model of the same
architecture is trained from another seed. An auditor submits both through the real REST
API; the in-process worker re-synchronizes, checks integrity and reads the watermark.

The demo is a client of the service: it starts the API in this process and talks HTTP to it.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import httpx

from app.models import JobStatus

MODEL = "mnist_cnn"
NOISE_OMEGA = 0.5
QUANT_BITS = 8


def _say(err: TextIO, text: str) -> None:
    print(text, file=err, flush=True)


def _check(r: httpx.Response, expected: int) -> dict[str, Any]:
    if r.status_code != expected:
        raise RuntimeError(f"{r.request.method} {r.request.url.path} answered {r.status_code}: {r.text}")
    return r.json()


def prepare_models(workdir: Path, err: TextIO) -> dict[str, Any]:
    """Train (or load from the cache) the reference, build the suspect and the unrelated model."""
    import torch

    from findlady_core import attacks
    from findlady_core.io import save_state_dict
    from findlady_core.trace import trace_spec
    from findlady_core.watermark import generate_key, save_key
    from findlady_examples import models, train

    t0 = time.perf_counter()
    layer = models.MnistCNN.watermark_layer
    shape = tuple(models.build(MODEL).state_dict()[layer].shape)
    key = generate_key(layer, shape, bits=64, seed=1234)
    _say(err, f"[1/4] training the owner's reference ({MODEL} on MNIST-5k, 64-bit watermark in {layer}) ...")
    model, ref_sd = train.trained(MODEL, seed=0, watermark_key=key, progress=err.isatty())
    spec = trace_spec(model, models.example_input(MODEL))
    _say(err, f"      done in {time.perf_counter() - t0:.1f} s; traced spec: {len(spec.groups)} neuron groups, "
              f"{spec.neurons} neurons")

    _say(err, f"[2/4] the thief's copy: every group permuted, noise Omega={NOISE_OMEGA} on every weight tensor, "
              f"{QUANT_BITS}-bit quantization; an unrelated model from another seed ...")
    attacked = attacks.permute(ref_sd, spec, seed=7)
    targets = attacks.attack_targets(attacked.state_dict)
    suspect_sd = attacks.gaussian_noise(attacked.state_dict, NOISE_OMEGA, targets=targets, seed=8)
    suspect_sd = attacks.quantize(suspect_sd, QUANT_BITS, targets=targets)
    _, unrelated_sd = train.trained(MODEL, seed=1, progress=err.isatty())

    test = train.held_out(MODEL)
    acc = {}
    for label, sd in (("reference", ref_sd), ("suspect", suspect_sd), ("unrelated", unrelated_sd)):
        m = models.build(MODEL)
        m.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()})
        m.eval()
        acc[label] = train.evaluate(m, test)
    _say(err, "      test accuracy: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in acc.items()))

    paths = {"reference": workdir / "reference.safetensors", "spec": workdir / "spec.json",
             "key": workdir / "key.safetensors", "suspect": workdir / "suspect.safetensors",
             "unrelated": workdir / "unrelated.safetensors"}
    save_state_dict(ref_sd, paths["reference"])
    spec.save(paths["spec"])
    save_key(key, paths["key"])
    save_state_dict(suspect_sd, paths["suspect"])
    save_state_dict(unrelated_sd, paths["unrelated"])
    return {"paths": paths, "accuracy": acc}


def _progress(err: TextIO, jobs: dict[str, dict[str, Any]], t0: float) -> None:
    parts = []
    for label, j in jobs.items():
        extra = f" (attempt {j['attempts']})" if j["status"] == JobStatus.RUNNING and j["attempts"] > 1 else ""
        parts.append(f"{label}: {j['status']}{extra}")
    line = f"      {time.perf_counter() - t0:5.1f} s  " + "  |  ".join(parts)
    if err.isatty():
        print("\r" + line.ljust(100), end="", file=err, flush=True)
    else:
        print(line, file=err, flush=True)


def _describe(label: str, job: dict[str, Any], out: TextIO) -> None:
    print(f"\n{label}: job {job['id']} {job['status']} after {job['attempts']} attempt(s)", file=out)
    if job["status"] != JobStatus.SUCCEEDED:
        print(f"  error: {job.get('error')}", file=out)
        return
    rep = job["report"]
    print(f"  verdict: {rep['verdict']}", file=out)
    wm = rep.get("watermark") or {}
    if wm:
        print(f"  watermark bit errors: {wm.get('bit_errors_before_resync')} of {wm.get('bits')} before "
              f"re-synchronization, {wm.get('bit_errors')} of {wm.get('bits')} after "
              f"(p = {wm.get('p_value'):.3g}, detected: {wm.get('detected')})", file=out)
    rs = rep.get("resync") or {}
    groups = rs.get("groups") or []
    if groups:
        moved = sum(g.get("moved", 0) for g in groups)
        total = sum(g.get("size", 0) for g in groups)
        print(f"  re-synchronization: {moved} of {total} neurons reordered, {rs.get('seconds', 0):.2f} s", file=out)
    integ = rep.get("integrity") or {}
    if integ:
        flagged = integ.get("flagged_count", len(integ.get("flagged") or []))
        print(f"  integrity: {integ.get('status')} ({flagged} neurons flagged)", file=out)
    for reason in rep.get("reasons", []):
        print(f"  - {reason}", file=out)


def run_demo(*, data_dir: Path | None = None, device: str = "auto", out: TextIO = sys.stdout,
             err: TextIO = sys.stderr, timeout: float = 600.0, serve: bool = False) -> int:
    """Run the demo; 0 when the suspect is a (modified) match and the unrelated model is not.

    It prints the dashboard's address of the suspect's job; with ``serve`` the API (and so the
    dashboard) runs on after the demo, on the same port and data, until interrupted."""
    import torch

    from app.core.config import Settings
    from app.main import create_app
    from app.server import BackgroundServer

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory(prefix="findlady-demo-") as tmp:
        root = Path(data_dir) if data_dir is not None else Path(tmp)
        workdir = root / "files"
        workdir.mkdir(parents=True, exist_ok=True)
        prepared = prepare_models(workdir, err)
        paths = prepared["paths"]

        admin = "fladmin_" + secrets.token_urlsafe(24)
        settings = Settings(data_dir=root / "service", admin_key=admin, secret=secrets.token_urlsafe(32),
                            database_url=None, broker_url=None, device=device)
        _say(err, f"[3/4] starting the API on the embedded default (SQLite, in-process worker, blobs under {settings.data_dir})")
        with BackgroundServer(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=120) as http:
            def bearer(k: str) -> dict[str, str]:
                return {"Authorization": f"Bearer {k}"}

            owner = _check(http.post("/v1/accounts", json={"name": "model owner", "role": "owner"}, headers=bearer(admin)), 201)
            auditor = _check(http.post("/v1/accounts", json={"name": "auditor", "role": "auditor"}, headers=bearer(admin)), 201)
            with paths["reference"].open("rb") as w, paths["spec"].open("rb") as s, paths["key"].open("rb") as k:
                ref = _check(http.post("/v1/references", headers=bearer(owner["api_key"]), data={"name": "mnist-cnn"},
                                       files={"weights": w, "spec": s, "key": k}), 201)
            _say(err, f"      owner registered reference {ref['id']} (v{ref['version']}, {ref['parameters']} parameters, "
                      f"{ref['groups']} groups, key on {ref['key_layer']})")
            jobs: dict[str, dict[str, Any]] = {}
            for label in ("suspect", "unrelated"):
                with paths[label].open("rb") as f:
                    r = http.post("/v1/verifications", headers=bearer(auditor["api_key"]),
                                  data={"reference_id": ref["id"]}, files={"suspect": f})
                jobs[label] = _check(r, 202)
                jobs[label]["location"] = r.headers["Location"]
            _say(err, "[4/4] the auditor submitted both; waiting for the worker ...")
            t0 = time.perf_counter()
            while True:
                for label, j in jobs.items():
                    if not JobStatus(j["status"]).finished:
                        jobs[label] = {**_check(http.get(j["location"], headers=bearer(auditor["api_key"])), 200),
                                       "location": j["location"]}
                _progress(err, jobs, t0)
                if all(JobStatus(j["status"]).finished for j in jobs.values()):
                    break
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"jobs not finished after {timeout:.0f} s")
                time.sleep(0.5)
            if err.isatty():
                print(file=err)
            trail = _check(http.get(jobs["suspect"]["location"] + "/audit", headers=bearer(owner["api_key"])), 200)

        acc = prepared["accuracy"]
        print(f"FindLady demo: reference {MODEL}, test accuracy {100 * acc['reference']:.1f}%", file=out)
        print(f"  thief's copy (permuted + noise {NOISE_OMEGA} + {QUANT_BITS}-bit): "
              f"accuracy {100 * acc['suspect']:.1f}%", file=out)
        print(f"  unrelated model (seed 1): accuracy {100 * acc['unrelated']:.1f}%", file=out)
        _describe("suspect (the thief's copy)", jobs["suspect"], out)
        _describe("unrelated model", jobs["unrelated"], out)
        print(f"\naudit trail of the suspect's job: {len(trail['events'])} events, hash chain verified: {trail['verified']}",
              file=out)
        sus = (jobs["suspect"].get("report") or {}).get("verdict")
        unr = (jobs["unrelated"].get("report") or {}).get("verdict")
        ok = sus in ("match", "match_modified") and unr == "no_match"
        print(f"\nresult: {'OK' if ok else 'UNEXPECTED'}: suspect -> {sus}, unrelated -> {unr}", file=out)
        dashboard = f"{server.url}/ui/verifications/{jobs['suspect']['id']}"
        print(f"\ndashboard: {dashboard}\n  sign in with the owner's key {owner['api_key']}"
              + ("" if serve else "\n  (the server has stopped: run `findlady demo --serve` to keep it up)"), file=out)
        if serve:
            _serve_on(settings, server.port, err)
        return 0 if ok else 1


def _serve_on(settings: Any, port: int, err: TextIO) -> None:
    """The demo's API again, on its port and data, until Ctrl-C (the dashboard needs a live server)."""
    from app.main import create_app
    from app.server import BackgroundServer

    with BackgroundServer(create_app(settings), port=port):
        _say(err, "serving the API and the dashboard; Ctrl-C stops")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            _say(err, "stopped")
