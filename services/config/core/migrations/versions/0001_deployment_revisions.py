"""Versioned deployment specs: immutable revisions and the audit trail.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "deployment_revisions",
        sa.Column("revision", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("deployment", sa.String(length=200), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("content_sha256", sa.String(length=64), nullable=False),
        sa.Column("author", sa.String(length=200), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("CURRENT_TIMESTAMP"),
            nullable=False,
        ),
        sa.Column("change_kind", sa.String(length=16), nullable=False),
        sa.Column("rolled_back_from", sa.BigInteger(), nullable=True),
        sa.Column("message", sa.Text(), server_default=sa.text("''"), nullable=False),
        sa.CheckConstraint(
            "change_kind IN ('publish', 'rollback', 'delete')",
            name=op.f("ck_deployment_revisions_change_kind"),
        ),
        sa.CheckConstraint(
            "(change_kind = 'rollback') = (rolled_back_from IS NOT NULL)",
            name=op.f("ck_deployment_revisions_rollback_has_source"),
        ),
        sa.ForeignKeyConstraint(
            ["rolled_back_from"],
            ["deployment_revisions.revision"],
            name=op.f("fk_deployment_revisions_rolled_back_from_deployment_revisions"),
        ),
        sa.PrimaryKeyConstraint("revision", name=op.f("pk_deployment_revisions")),
    )
    op.create_index(
        op.f("ix_deployment_revisions_deployment_revision"),
        "deployment_revisions",
        ["deployment", "revision"],
        unique=True,
    )
    op.create_index(
        op.f("ix_deployment_revisions_deployment_content_sha256"),
        "deployment_revisions",
        ["deployment", "content_sha256"],
    )

    op.create_table(
        "config_audit",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("revision", sa.BigInteger(), nullable=True),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.Text(), server_default=sa.text("'{}'"), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("CURRENT_TIMESTAMP"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["revision"],
            ["deployment_revisions.revision"],
            name=op.f("fk_config_audit_revision_deployment_revisions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_config_audit")),
    )
    op.create_index(op.f("ix_config_audit_revision"), "config_audit", ["revision"])
    op.create_index(op.f("ix_config_audit_created_at"), "config_audit", ["created_at"])


def downgrade() -> None:
    op.drop_table("config_audit")
    op.drop_table("deployment_revisions")
