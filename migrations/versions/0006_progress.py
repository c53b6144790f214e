"""A running job's progress; a finished job's verdict and phase timings, for /metrics.

Revision ID: 0006
Revises: 0005
Create Date: 2026-01-10

``progress`` is ``{phase, done, total}`` while a job runs (NULL otherwise). ``verdict`` and
``timings`` copy two fields of the stored report so /metrics can count verdicts and
histogram phase durations without reading every report; rows from before stay NULL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN, as in 0002: no batch copy of a table others hold foreign keys on.
    op.add_column("verifications", sa.Column("progress", JSONType, nullable=True))
    op.add_column("verifications", sa.Column("verdict", sa.String(16), nullable=True))
    op.add_column("verifications", sa.Column("timings", JSONType, nullable=True))


def downgrade() -> None:
    op.drop_column("verifications", "timings")
    op.drop_column("verifications", "verdict")
    op.drop_column("verifications", "progress")
