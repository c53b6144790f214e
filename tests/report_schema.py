"""The published report schema as a test helper: ``assert_valid(report)``, and the count of
reports the suite produced in-process (each one checked as it was assembled, see conftest)."""

from __future__ import annotations

import json
from typing import Any

from jsonschema import Draft202012Validator

from findlady_core.report_format import schema

VALIDATOR = Draft202012Validator(schema(), format_checker=Draft202012Validator.FORMAT_CHECKER)
CHECKED: list[str] = []  # verdicts of the reports checked so far in this session


def errors(report: Any) -> list[str]:
    doc = json.loads(json.dumps(report))  # what a client would parse
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in VALIDATOR.iter_errors(doc)]


def assert_valid(report: Any) -> None:
    problems = errors(report)
    assert not problems, "report does not match findlady_core/schemas/report-2.json:\n" + "\n".join(problems[:20])
