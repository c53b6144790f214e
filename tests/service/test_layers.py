"""The arrows run one way: a Celery worker never loads the web framework, and the service
never loads the worker shell or the benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _modules_after(imports: str, tmp_path: Path) -> set[str]:
    code = f"import sys\n{imports}\nimport json\nprint(json.dumps(sorted(sys.modules)))"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FINDLADY_")}, "FINDLADY_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_celery_worker_does_not_import_fastapi(tmp_path: Path) -> None:
    loaded = _modules_after("import workers.tasks", tmp_path)
    assert "workers.tasks" in loaded and "app.jobs.runner" in loaded
    assert "fastapi" not in loaded and "starlette" not in loaded and "uvicorn" not in loaded


@pytest.mark.parametrize("module", ["app.main", "app.jobs.queue", "findlady_cli.service"])
def test_service_imports_neither_workers_nor_benchmarks(tmp_path: Path, module: str) -> None:
    loaded = _modules_after(f"import {module}", tmp_path)
    assert module in loaded
    assert not {m for m in loaded if m.split(".")[0] in ("workers", "benchmarks")}


def test_the_api_imports_torch_only_to_read_a_model(tmp_path: Path) -> None:
    """torch and the core's solvers are 200 MB of the API's memory: an app that has not read a
    model yet holds none of it (its RSS while receiving an upload stays small)."""
    loaded = _modules_after("import app.main\napp.main.create_app()", tmp_path)
    assert "fastapi" in loaded
    assert "torch" not in loaded
