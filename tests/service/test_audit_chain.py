"""The audit chain can be checked end to end (admin endpoint and `findlady audit verify`), and
a row edited, deleted or forged behind the database's back is reported at the right link.

The tests tamper the way an intruder with database access would: on SQLite by dropping the
append-only trigger, editing, and recreating it; on PostgreSQL with ALTER TABLE ... DISABLE
TRIGGER. Without tampering, both databases refuse UPDATE and DELETE on the table.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DatabaseError

from app import audit
from findlady_cli.main import main as cli_main
from app.core.db import upgrade
from app.models import AuditEvent
from app.runtime import Runtime

from .helpers import auth, hammer, test_settings
from .test_services import pg_url  # noqa: F401  (fixture: a fresh PostgreSQL database)

SQLITE_TRIGGER = ("CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events "
                  "BEGIN SELECT RAISE(ABORT, 'audit_events is append-only (UPDATE refused)'); END")
SQLITE_DELETE_TRIGGER = SQLITE_TRIGGER.replace("update", "delete").replace("UPDATE", "DELETE")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def runtime(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Runtime]:
    """A migrated database of each kind holding 12 chained events."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    rt = Runtime.from_settings(test_settings(tmp_path, database_url=url))
    upgrade(rt.settings.db_url)
    if url is not None:
        with rt.engine.begin() as c:  # the module shares one database: start each test empty
            c.execute(text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
            c.execute(text("DELETE FROM audit_events"))
            c.execute(text("ALTER TABLE audit_events ENABLE TRIGGER USER"))
    hammer(rt, threads=2, each=6)
    try:
        yield rt
    finally:
        rt.close()


def tamper(rt: Runtime, sql: str, **params: object) -> None:
    """Run ``sql`` with the append-only triggers out of the way, then put them back."""
    with rt.engine.begin() as c:
        if rt.engine.dialect.name == "postgresql":
            c.execute(text("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only"))
            c.execute(text(sql), params)
            c.execute(text("ALTER TABLE audit_events ENABLE TRIGGER audit_events_append_only"))
        else:
            c.execute(text("DROP TRIGGER audit_events_no_update"))
            c.execute(text("DROP TRIGGER audit_events_no_delete"))
            c.execute(text(sql), params)
            c.execute(text(SQLITE_TRIGGER))
            c.execute(text(SQLITE_DELETE_TRIGGER))


def check(rt: Runtime) -> audit.ChainCheck:
    with rt.sessions() as s:
        return audit.check_chain(s, rt.secret, batch=5)  # small batches: the walk crosses pages


def cli(rt: Runtime, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    """`findlady audit verify --json` against this database, configured as an operator would."""
    monkeypatch.setenv("FINDLADY_DATA_DIR", str(rt.settings.data_dir))
    monkeypatch.setenv("FINDLADY_SECRET", rt.secret.decode())
    if rt.settings.database_url:
        monkeypatch.setenv("FINDLADY_DATABASE_URL", rt.settings.database_url)
    else:
        monkeypatch.delenv("FINDLADY_DATABASE_URL", raising=False)
    capsys.readouterr()
    rc = cli_main(["audit", "verify", "--data-dir", str(rt.settings.data_dir), "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_intact_chain(runtime: Runtime, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    c = check(runtime)
    assert c.intact and c.events == 12 and c.broken_seq is None
    rc, out = cli(runtime, monkeypatch, capsys)
    assert rc == 0 and out == {"intact": True, "events": 12, "head_hash": c.head_hash, "first_broken": None}


@pytest.mark.parametrize("verb", ["UPDATE", "DELETE"])
def test_database_refuses_rewrites(runtime: Runtime, verb: str) -> None:
    sql = "UPDATE audit_events SET kind = 'forged' WHERE seq = 3" if verb == "UPDATE" else \
        "DELETE FROM audit_events WHERE seq = 3"
    with runtime.engine.connect() as c:
        with pytest.raises(DatabaseError, match="append-only"):
            c.execute(text(sql))
        c.rollback()
    assert check(runtime).intact


def test_edited_row_is_reported(runtime: Runtime, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    payload = json.dumps({"thread": 0, "i": 99})
    tamper(runtime, "UPDATE audit_events SET payload = :p WHERE seq = 7", p=payload)
    c = check(runtime)
    assert (c.intact, c.broken_seq, c.events) == (False, 7, 6)
    assert "edited" in (c.reason or "")
    rc, out = cli(runtime, monkeypatch, capsys)
    assert rc == 1 and out["first_broken"]["seq"] == 7 and out["events"] == 6


def test_deleted_row_is_reported(runtime: Runtime) -> None:
    tamper(runtime, "DELETE FROM audit_events WHERE seq = 5")
    c = check(runtime)
    assert (c.intact, c.broken_seq, c.events) == (False, 6, 4)
    assert "missing" in (c.reason or "")


def test_rehashed_row_breaks_the_next_link(runtime: Runtime) -> None:
    """Even an intruder holding the server secret, who edits a row and recomputes its hash,
    breaks the link from the next row (its prev_hash still names the old hash)."""
    with runtime.sessions() as s:
        row = s.get(AuditEvent, 4)
        assert row is not None
        content = audit.content_of(4, row.job_id, "edited", {"x": 1}, row.created_at)
        rehashed = audit.chain_hash(runtime.secret, row.prev_hash, content)
    tamper(runtime, "UPDATE audit_events SET kind = 'edited', payload = :p, hash = :h WHERE seq = 4",
           p=json.dumps({"x": 1}), h=rehashed)
    c = check(runtime)
    assert (c.intact, c.broken_seq, c.events) == (False, 5, 4)
    assert "prev_hash" in (c.reason or "")


def test_admin_endpoint_reports_the_break(embedded) -> None:  # type: ignore[no-untyped-def]
    app, api = embedded
    for _ in range(3):
        api.account("auditor")
    r = api.http.get("/v1/audit/verify", headers=auth(api.admin_key))
    assert r.status_code == 200 and r.json()["intact"] is True and r.json()["first_broken"] is None
    n = r.json()["events"]
    assert n >= 3
    rt = app.state.runtime
    tamper(rt, "UPDATE audit_events SET payload = :p WHERE seq = 2", p=json.dumps({"role": "admin"}))
    r = api.http.get("/v1/audit/verify", headers=auth(api.admin_key))
    body = r.json()
    assert r.status_code == 200 and body["intact"] is False and body["events"] == 1
    assert body["first_broken"]["seq"] == 2 and "edited" in body["first_broken"]["reason"]
    assert api.http.get("/v1/audit/verify", headers=auth(api.account("owner"))).status_code == 403
