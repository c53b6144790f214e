"""The service's commands: ``serve``, ``worker``, ``demo`` and ``audit verify``.

    findlady serve [--host H] [--port P] [--data-dir D]     the API (+ in-process worker when no broker)
    findlady worker [--data-dir D] [--concurrency N] [--pool prefork|solo|threads]   a Celery worker
    findlady demo [--data-dir D] [--device auto|cpu|cuda] [--serve]   the main job end to end
    findlady audit verify [--data-dir D] [--json]           walk the audit hash chain (exit 1 if broken)
    findlady signing rotate [--data-dir D]                  new report-signing key; the old one stays published

``findlady_cli.main`` calls ``register``. The service (FastAPI, uvicorn, Celery, SQLAlchemy)
is imported inside the handlers, so ``findlady --help`` and the core commands stay fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], int]
Add = Callable[[Any, str, str, str, Handler], argparse.ArgumentParser]


def _apply_data_dir(args: argparse.Namespace) -> None:
    # Settings (and the Celery app module) read the environment: set it before they load.
    if getattr(args, "data_dir", None):
        os.environ["FINDLADY_DATA_DIR"] = str(Path(args.data_dir).resolve())


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.core.config import Settings
    from app.core.db import upgrade
    from app.main import create_app

    from app import logs

    _apply_data_dir(args)
    logs.configure("INFO")
    settings = Settings()
    log = logging.getLogger("findlady.serve")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    log.info("database: %s", "SQLite file " + settings.db_url.removeprefix("sqlite:///") if not settings.database_url
             else "FINDLADY_DATABASE_URL")
    log.info("jobs: %s", "Celery broker (FINDLADY_BROKER_URL)" if settings.broker_url
             else f"in-process worker ({settings.worker_threads} thread(s))")
    log.info("blobs: %s", (settings.data_dir / "blobs").resolve())
    # Say what happened to each secret: generated now, or reused from the data folder.
    if settings.secret is None:
        path = (settings.data_dir / "secret.key").resolve()
        how = "reusing the secret stored" if path.exists() else "generated a secret, stored"
        settings.secret_bytes()
        log.warning("FINDLADY_SECRET unset: %s in %s (share it with every worker)", how, path)
    if settings.admin_key is None:
        path = (settings.data_dir / "admin.key").resolve()
        how = "reusing the admin key stored" if path.exists() else "the admin key was generated and is stored"
        settings.admin_key_value()
        log.warning("FINDLADY_ADMIN_KEY unset: %s in %s", how, path)
    upgrade(settings.db_url)
    app = create_app(settings, migrate=False)
    # log_config=None: uvicorn's loggers go through ours (one format, JSON when asked).
    # On SIGTERM/SIGINT uvicorn stops serving, then the app's shutdown hands running jobs back.
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", proxy_headers=args.proxy_headers,
                log_config=None, timeout_graceful_shutdown=10)
    return 0


def run_worker(args: argparse.Namespace) -> int:
    _apply_data_dir(args)
    from app import logs
    from app.core.config import Settings
    from app.core.db import upgrade

    logs.configure(args.loglevel.upper())  # before Celery loads: its first warnings in our format too

    settings = Settings()
    if not settings.broker_url:
        print("findlady worker: FINDLADY_BROKER_URL is not set; without a broker, `findlady serve` runs the "
              "jobs in-process", file=sys.stderr)
        return 2
    upgrade(settings.db_url)
    from workers.celery_app import celery_app

    argv = ["worker", f"--loglevel={args.loglevel}", "-Q", settings.queue_name, f"--pool={args.pool}",
            f"--concurrency={args.concurrency}", "--without-gossip", "--without-mingle"]
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    celery_app.worker_main(argv)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from findlady_cli.demo import run_demo as demo

    return demo(data_dir=Path(args.data_dir) if args.data_dir else None, device=args.device, serve=args.serve)


def run_audit_verify(args: argparse.Namespace) -> int:
    """Walk the audit chain in the configured database; exit 0 intact, 1 broken."""
    import json

    from sqlalchemy import inspect

    from app import audit
    from app.core.config import Settings
    from app.runtime import Runtime

    _apply_data_dir(args)
    settings = Settings()
    if settings.secret is None and not (settings.data_dir / "secret.key").exists():
        # A freshly generated secret would call every event forged: refuse instead.
        print(f"findlady audit verify: no FINDLADY_SECRET and no {settings.data_dir / 'secret.key'}; "
              "point --data-dir or FINDLADY_SECRET at the service's secret", file=sys.stderr)
        return 2
    runtime = Runtime.from_settings(settings)
    try:
        if not inspect(runtime.engine).has_table("audit_events"):
            print("findlady audit verify: the database has no audit_events table (never migrated?)", file=sys.stderr)
            return 2
        with runtime.sessions() as session:
            check = audit.check_chain(session, runtime.secret)
            session.rollback()
    finally:
        runtime.close()
    if args.json:
        print(json.dumps(check.as_dict()))
    elif check.intact:
        print(f"audit chain intact: {check.events} events, head {check.head_hash}")
    else:
        print(f"audit chain BROKEN at seq {check.broken_seq}: {check.reason} "
              f"({check.events} good events before it)")
    return 0 if check.intact else 1


def run_signing_rotate(args: argparse.Namespace) -> int:
    """Retire the generated report-signing key (its public half stays published) and start a new one."""
    _apply_data_dir(args)
    from app.core.config import Settings
    from app.core.signing import SigningKeyError, SigningKeys

    try:
        new_id = SigningKeys(Settings()).rotate()
    except SigningKeyError as e:
        print(f"findlady signing rotate: {e}", file=sys.stderr)
        return 2
    print(new_id)
    return 0


def register(subparsers: Any, add: Add) -> None:
    """Add the service commands to the ``findlady`` parser's top-level ``subparsers``.

    ``add(registry, name, summary, description, func)`` (from ``findlady_cli.main``) makes a
    command with the common options (``--json``, ``--quiet``); ``serve``, ``worker`` and
    ``demo`` take none of those and are added directly, as they always were.
    """
    p = subparsers.add_parser(
        "serve", help="run the REST API (embedded default: SQLite, local blobs, in-process worker)",
        description="Start the FindLady API. Without FINDLADY_DATABASE_URL and FINDLADY_BROKER_URL it "
        "runs on a SQLite file, a local blob folder and an in-process worker under --data-dir.")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--data-dir", help="blobs, SQLite file and generated secrets (FINDLADY_DATA_DIR, default ./var)")
    p.add_argument("--proxy-headers", action="store_true", help="trust X-Forwarded-* from a reverse proxy")
    p.set_defaults(func=run_serve)

    p = subparsers.add_parser(
        "worker", help="run a Celery worker for verification jobs (needs FINDLADY_BROKER_URL)",
        description="Start a Celery worker consuming the FindLady queue. Uses CUDA when present.")
    p.add_argument("--data-dir", help="shared blob folder (FINDLADY_DATA_DIR)")
    p.add_argument("--concurrency", type=int, default=1, help="worker processes (default 1: one job per GPU/CPU set)")
    p.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"], help="Celery pool")
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("--hostname", help="Celery node name")
    p.set_defaults(func=run_worker)

    p = subparsers.add_parser(
        "demo", help="the main job end to end on the embedded default",
        description="Train a watermarked reference, build a permuted+noisy+quantized copy and an "
        "unrelated model, verify both through the REST API, print the verdicts.")
    p.add_argument("--data-dir", help="keep the demo's files and service data here (default: a temporary folder)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--serve", action="store_true",
                   help="keep the API and its dashboard (/ui/) running after the demo, until Ctrl-C")
    p.set_defaults(func=run_demo)

    p = subparsers.add_parser("audit", help="check the service's audit trail",
                              description="Audit trail tools; reads FINDLADY_DATABASE_URL and FINDLADY_SECRET "
                              "(or --data-dir).")
    audit_sub = p.add_subparsers(dest="audit_command", metavar="verify", required=True)
    p = add(audit_sub, "verify", "walk the hash chain; report the first broken link (exit 1 if any)",
            "Re-check every audit event's HMAC and its link to the previous event. "
            "Exit 0: intact; 1: broken (the first broken seq and why). --json prints "
            "{intact, events, head_hash, first_broken}.", run_audit_verify)
    p.add_argument("--data-dir", help="data folder holding the generated secret and SQLite file (FINDLADY_DATA_DIR)")

    p = subparsers.add_parser("signing", help="the report-signing key",
                              description="Ed25519 key that signs reports (data folder or FINDLADY_SIGNING_KEY).")
    signing_sub = p.add_subparsers(dest="signing_command", metavar="rotate", required=True)
    p = signing_sub.add_parser("rotate", help="retire the generated signing key and start a new one (prints its id)",
                               description="The retired public key stays at GET /v1/signing-keys, so reports "
                               "signed before still verify. The API picks the new key up at once.")
    p.add_argument("--data-dir", help="the service's data folder (FINDLADY_DATA_DIR)")
    p.set_defaults(func=run_signing_rotate)
