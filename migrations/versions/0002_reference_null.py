"""Store each reference's null margin and the solver version that computed it.

Revision ID: 0002
Revises: 0001
Create Date: 2025-12-01

Rows from before this migration keep NULL in both columns; the next job against such a
reference computes the null and stores it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (no batch table copy): SQLite supports it, and rebuilding
    # reference_models would trip the foreign keys that verifications hold on it.
    op.add_column("reference_models", sa.Column("null_margin", sa.Float(), nullable=True))
    op.add_column("reference_models", sa.Column("null_solver_version", sa.String(32), nullable=True))


def downgrade() -> None:
    # DROP COLUMN: SQLite 3.35+ and PostgreSQL.
    op.drop_column("reference_models", "null_solver_version")
    op.drop_column("reference_models", "null_margin")
