"""Fixtures of the service tests (helpers live in ``helpers.py``)."""

from __future__ import annotations

import pytest

from app.main import create_app
from app.server import BackgroundServer

from .helpers import Api, files, test_settings  # noqa: F401  (``files`` is a fixture)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The embedded default (SQLite, in-process worker, local blobs) behind a real uvicorn."""
    settings = test_settings(tmp_path_factory.mktemp("service"))
    app = create_app(settings)
    with BackgroundServer(app) as server:
        yield app, Api(server.url, settings.admin_key_value())
