"""Offline store catalog: which tables liveloop loaded, their schema and the loads themselves.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
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
        "ll_tables",
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("key_columns", sa.Text(), nullable=False),
        sa.Column("event_time_column", sa.String(length=63), nullable=False, server_default=sa.text("''")),
        sa.Column("columns", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False, server_default=sa.text("''")),
        sa.Column("row_count", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_ll_tables")),
    )
    op.create_table(
        "ll_loads",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("table_name", sa.String(length=63), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("rows_written", sa.BigInteger(), nullable=False),
        sa.Column("rows_rejected", sa.BigInteger(), nullable=False),
        sa.Column("loaded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ll_loads")),
    )
    op.create_index(op.f("ix_ll_loads_table_name_fingerprint"), "ll_loads", ["table_name", "fingerprint"])
    op.create_table(
        "ll_materializations",
        sa.Column("feature_view", sa.String(length=63), nullable=False),
        sa.Column("watermark", sa.Text(), nullable=False),
        sa.Column("entities", sa.BigInteger(), nullable=False),
        sa.Column("materialized_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("feature_view", name=op.f("pk_ll_materializations")),
    )


def downgrade() -> None:
    op.drop_table("ll_materializations")
    op.drop_table("ll_loads")
    op.drop_table("ll_tables")
