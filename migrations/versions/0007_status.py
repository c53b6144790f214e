"""A reference's status: preparing (its null margin is being computed), ready or failed.

Revision ID: 0007
Revises: 0006
Create Date: 2025-12-01

Existing rows are ready (their null was computed at registration, or a job computes it).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN, as 0002: no batch copy of reference_models (foreign keys point at it).
    op.add_column("reference_models", sa.Column("status", sa.String(16), nullable=False, server_default="ready"))
    op.add_column("reference_models", sa.Column("status_error", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("reference_models", "status_error")
    op.drop_column("reference_models", "status")
