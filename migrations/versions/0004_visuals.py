"""Store each finished job's pictures (``findlady_core.visuals``, served to the dashboard).

Revision ID: 0004
Revises: 0003
Create Date: 2025-12-01

A JSON document beside the report: similarity matrices before and after re-synchronization
(at most 256 x 256 per group), margin histograms, integrity counts, watermark bits. Jobs
finished before this migration keep NULL (the dashboard then shows the report only).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    # Plain ADD COLUMN (no batch table copy), as in 0002: both databases add a nullable column in place.
    op.add_column("verifications", sa.Column("visuals", JSONType, nullable=True))


def downgrade() -> None:
    op.drop_column("verifications", "visuals")
