"""Initial schema: accounts, reference models, verifications, append-only audit events.

Revision ID: 0001
Revises:
Create Date: 2025-11-25

Note for later SQLite migrations: batch operations recreate a table and drop its triggers;
recreate the audit_events triggers after any batch operation on that table.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("key_prefix", sa.String(32), nullable=False, unique=True),
        sa.Column("key_hash", sa.String(64), nullable=False),
        _ts("created_at"),
        _ts("last_used_at", nullable=True),
        sa.CheckConstraint("role IN ('owner', 'auditor')", name="ck_accounts_role"),
    )
    op.create_table(
        "reference_models",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner_id", sa.String(36), sa.ForeignKey("accounts.id"), nullable=False, index=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("parameters", sa.BigInteger, nullable=False),
        sa.Column("spec", JSONType, nullable=False),
        sa.Column("spec_source", sa.String(16), nullable=False),
        sa.Column("key_sha256", sa.String(64), nullable=True),
        sa.Column("key_layer", sa.String(1024), nullable=True),
        sa.Column("shapes", JSONType, nullable=False),
        _ts("created_at"),
        sa.UniqueConstraint("owner_id", "name", "version", name="uq_reference_owner_name_version"),
    )
    op.create_table(
        "verifications",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("reference_id", sa.String(36), sa.ForeignKey("reference_models.id"), nullable=False, index=True),
        sa.Column("submitter_id", sa.String(36), sa.ForeignKey("accounts.id"), nullable=False, index=True),
        sa.Column("suspect_sha256", sa.String(64), nullable=False),
        sa.Column("suspect_size_bytes", sa.BigInteger, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("report", JSONType, nullable=True),
        sa.Column("error", JSONType, nullable=True),
        _ts("created_at"),
        _ts("enqueued_at", nullable=True),
        _ts("started_at", nullable=True),
        _ts("finished_at", nullable=True),
        _ts("lease_expires_at", nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed')", name="ck_verifications_status"
        ),
    )
    op.create_table(
        "audit_events",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("job_id", sa.String(36), nullable=True, index=True),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("payload", JSONType, nullable=False),
        _ts("created_at"),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False, unique=True),
    )

    # The audit trail is append-only: the database itself refuses UPDATE and DELETE.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION findlady_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION USING MESSAGE = 'audit_events is append-only (' || TG_OP || ' refused)';
            END
            $$
            """
        )
        op.execute(
            "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events "
            "FOR EACH ROW EXECUTE FUNCTION findlady_audit_append_only()"
        )
        op.execute(
            "CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events "
            "FOR EACH STATEMENT EXECUTE FUNCTION findlady_audit_append_only()"
        )
    else:
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_events_no_{verb.lower()} BEFORE {verb} ON audit_events "
                f"BEGIN SELECT RAISE(ABORT, 'audit_events is append-only ({verb} refused)'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_truncate ON audit_events")
        op.execute("DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events")
        op.execute("DROP FUNCTION IF EXISTS findlady_audit_append_only()")
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_update")
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_delete")
    op.drop_table("audit_events")
    op.drop_table("verifications")
    op.drop_table("reference_models")
    op.drop_table("accounts")
