"""Sharing references with auditors; the re-synchronized suspect of a finished job.

Revision ID: 0003
Revises: 0002
Create Date: 2025-12-10

``reference_shares``: an owner lets named auditor accounts list and read one reference.
``verifications.resynced_sha256``: the blob holding the suspect re-synchronized to the
reference's order (safetensors), stored by the worker at the end of the job; NULL for jobs
from before this migration.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reference_shares",
        sa.Column("reference_id", sa.String(36), sa.ForeignKey("reference_models.id"), primary_key=True),
        sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id"), primary_key=True, index=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    # Plain ADD COLUMN: no batch copy of a table other rows hold foreign keys on.
    op.add_column("verifications", sa.Column("resynced_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("verifications", "resynced_sha256")
    op.drop_table("reference_shares")
