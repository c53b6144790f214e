"""Record the config.json of a reference uploaded as a model folder.

Revision ID: 0005
Revises: 0004
Create Date: 2026-01-15

A reference's blob may now be a folder (shards, index, config); its config is kept in the row
(NULL for single files and for rows from before this migration).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN, as in 0002: no batch copy of reference_models (foreign keys point at it).
    op.add_column("reference_models", sa.Column("config", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=True))


def downgrade() -> None:
    op.drop_column("reference_models", "config")
