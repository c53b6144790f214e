"""The CLI's help stays cheap: no torch, no service stack, for the commands that need neither.

Not timed (a timed test on a shared machine measures the machine); ``benchmarks/cli_startup.py``
times them against ``import torch``. What can be checked exactly is what was imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "findlady_core", "fastapi", "sqlalchemy", "celery", "uvicorn")
PROBE = """
import contextlib, io, json, sys
from findlady_cli.main import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    code = main(sys.argv[1:] + ['--help'])
print(json.dumps({"code": code, "help": out.getvalue(), "loaded": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


@pytest.mark.parametrize("command", [[], ["spec", "infer"], ["spec", "check"], ["resync"], ["verify"],
                                     ["watermark", "extract"], ["serve"], ["worker"], ["demo"], ["audit", "verify"]])
def test_command_help_imports_nothing_heavy(command: list[str]) -> None:
    r = subprocess.run([sys.executable, "-c", PROBE, *command], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["code"] == 0 and "usage: findlady" in result["help"]
    assert result["loaded"] == [], f"findlady {' '.join(command)} --help imported {result['loaded']}"


@pytest.mark.parametrize("command", [["attack"], ["watermark", "embed"]])
def test_registry_help_lists_everything_without_torch(command: list[str]) -> None:
    """These helps list registries (every attack's flags and steps, the bundled models): they read
    the torch-free declarations (``findlady_core.attack_steps``, ``findlady_examples.names``)."""
    from findlady_core.attack_steps import REGISTRY
    from findlady_examples import models

    r = subprocess.run([sys.executable, "-c", PROBE, *command], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    assert [m for m in result["loaded"] if m != "findlady_core"] == []
    shown = [o.flag for a in REGISTRY.values() for o in a.options] if command == ["attack"] else list(models.MODELS)
    missing = [x for x in shown if x not in result["help"]]
    assert shown and not missing, f"findlady {' '.join(command)} --help lacks {missing}"


def test_example_model_names_match_the_models() -> None:
    from findlady_examples import models
    from findlady_examples.names import MODEL_NAMES

    assert tuple(models.MODELS) == MODEL_NAMES


def test_benchmark_quick_runs_and_compares_against_torch() -> None:
    r = subprocess.run([sys.executable, "-m", "benchmarks", "cli_startup", "--quick"], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["import_torch_median_s"] > 0
    assert [c["loads_torch"] for c in result["commands"]] == [False, False, False]
