"""Fuzz every operation of the OpenAPI document with schemathesis: whatever it sends, the API
never answers 5xx. Bounded (a few examples per operation and role), so it stays in CI.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis (the [test] extra)")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from app.main import create_app  # noqa: E402
from app.server import BackgroundServer  # noqa: E402

from .helpers import Api, Files, test_settings  # noqa: E402

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(120)]

MAX_EXAMPLES = 15


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory, files: Files):  # type: ignore[no-untyped-def]
    settings_ = test_settings(tmp_path_factory.mktemp("fuzz"))
    app = create_app(settings_)
    with BackgroundServer(app) as server:
        api = Api(server.url, settings_.admin_key_value())
        owner, auditor = api.account("owner"), api.account("auditor")
        ref = api.register(owner, "fuzzed", weights=files.reference, spec=files.spec)
        assert ref.status_code == 201, ref.text
        assert app.openapi() == schema.raw_schema  # the document fuzzed is the one served
        yield {"url": server.url, "keys": {"admin": api.admin_key, "owner": owner, "auditor": auditor}}


def _openapi() -> dict[str, Any]:
    """The OpenAPI document, built at import time (parametrize needs it at collection)."""
    with tempfile.TemporaryDirectory(prefix="findlady-openapi-") as d:
        app = create_app(test_settings(Path(d)), migrate=False, workers=False)
        doc = app.openapi()
        app.state.runtime.close()
        return doc


schema = schemathesis.openapi.from_dict(_openapi())


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: Any, fuzz_target: dict[str, Any]) -> None:
    # Rotate the caller over the roles so each operation is reached past its role check.
    roles = ("owner", "auditor", "admin")
    role = roles[hash((case.method, case.path, repr(case.body)[:64])) % len(roles)]
    case.call_and_validate(base_url=fuzz_target["url"], headers={"Authorization": f"Bearer {fuzz_target['keys'][role]}"},
                           checks=[not_a_server_error], timeout=30)
