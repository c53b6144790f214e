"""Alembic owns the schema: the migrations produce exactly the tables the models describe."""

from __future__ import annotations

from pathlib import Path

from alembic import command

from app.core.db import alembic_config, upgrade


def test_models_match_migrations_and_downgrade_works(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    command.check(alembic_config(url))  # raises when the models and the migrations differ
    command.downgrade(alembic_config(url), "base")
    upgrade(url)
