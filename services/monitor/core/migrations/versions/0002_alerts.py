"""Alerts of the monitor's alert rules, one row per episode.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-14
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NAME = 200


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("rule", sa.String(_NAME), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("deployment", sa.String(_NAME), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("summary", sa.Text, nullable=False),
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("resolved_at", sa.Float, nullable=True),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("id", "started_at", name=op.f("pk_alerts")),
    )
    op.create_index("ix_alerts_state_started_at", "alerts", ["state", "started_at"])
    op.create_index("ix_alerts_deployment_started_at", "alerts", ["deployment", "started_at"])


def downgrade() -> None:
    op.drop_table("alerts")
