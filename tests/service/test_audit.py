"""The audit chain: concurrent writers keep one unbroken chain; forgeries are detected."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from app import audit
from app.core.db import upgrade
from app.models import utcnow
from app.runtime import Runtime

from .helpers import hammer, test_settings


def test_concurrent_writers_keep_one_chain_and_forgeries_show(tmp_path: Path) -> None:
    rt = Runtime.from_settings(test_settings(tmp_path))
    upgrade(rt.settings.db_url)
    try:
        hammer(rt)
        with rt.sessions() as s:
            assert audit.verify_chain(s, rt.secret) == (True, 60)
            last = s.execute(text("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")).one()
        # A row appended behind the service's back, with a hash made without the secret.
        content = audit.content_of(last.seq + 1, None, "forged", {"x": 1}, utcnow())
        forged = audit.chain_hash(b"not the secret", last.hash, content)
        with rt.engine.begin() as c:
            c.execute(text("INSERT INTO audit_events (seq, job_id, kind, payload, created_at, prev_hash, hash) "
                           "VALUES (:seq, NULL, 'forged', :payload, :at, :prev, :hash)"),
                      {"seq": last.seq + 1, "payload": '{"x": 1}', "at": utcnow().replace(tzinfo=None),
                       "prev": last.hash, "hash": forged})
        with rt.sessions() as s:
            assert audit.verify_chain(s, rt.secret) == (False, 60)
    finally:
        rt.close()
