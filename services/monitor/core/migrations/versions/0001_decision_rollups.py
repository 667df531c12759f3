"""The monitor's first schema: per-minute rollups of the decision log, the consumer's ledger and
counters.

Revision ID: 0001
Revises:
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NAME = 200


def _minute_key(*extra: sa.Column) -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column("minute", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("deployment", sa.String(_NAME), primary_key=True),
        *extra,
    ]


def upgrade() -> None:
    op.create_table(
        "offer_minutes",
        *_minute_key(
            sa.Column("variant", sa.String(_NAME), primary_key=True),
            sa.Column("segment", sa.String(_NAME), primary_key=True),
            sa.Column("offer", sa.String(_NAME), primary_key=True),
            sa.Column("revision", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("replica", sa.String(_NAME), primary_key=True),
        ),
        sa.Column("impressions", sa.BigInteger, nullable=False),
        sa.Column("explored_impressions", sa.BigInteger, nullable=False),
        sa.Column("accepted", sa.BigInteger, nullable=False),
        sa.Column("reward_sum", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint(
            "minute",
            "deployment",
            "variant",
            "segment",
            "offer",
            "revision",
            "replica",
            name=op.f("pk_offer_minutes"),
        ),
    )
    op.create_index("ix_offer_minutes_deployment_minute", "offer_minutes", ["deployment", "minute"])
    op.create_table(
        "decision_minutes",
        *_minute_key(
            sa.Column("variant", sa.String(_NAME), primary_key=True),
            sa.Column("segment", sa.String(_NAME), primary_key=True),
            sa.Column("revision", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("replica", sa.String(_NAME), primary_key=True),
        ),
        sa.Column("invocations", sa.BigInteger, nullable=False),
        sa.Column("explore_decisions", sa.BigInteger, nullable=False),
        sa.Column("responses", sa.BigInteger, nullable=False),
        sa.Column("late_responses", sa.BigInteger, nullable=False),
        sa.Column("duplicate_responses", sa.BigInteger, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint(
            "minute",
            "deployment",
            "variant",
            "segment",
            "revision",
            "replica",
            name=op.f("pk_decision_minutes"),
        ),
    )
    op.create_index("ix_decision_minutes_deployment_minute", "decision_minutes", ["deployment", "minute"])
    op.create_table(
        "latency_minutes",
        *_minute_key(sa.Column("method", sa.String(_NAME), primary_key=True)),
        sa.Column("calls", sa.BigInteger, nullable=False),
        sa.Column("max_seconds", sa.Float, nullable=False),
        sa.Column("buckets", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("minute", "deployment", "method", name=op.f("pk_latency_minutes")),
    )
    op.create_table(
        "applied_batches",
        sa.Column("batch", sa.String(64), nullable=False),
        sa.Column("stream", sa.String(_NAME), nullable=False),
        sa.Column("first_ms", sa.BigInteger, nullable=False),
        sa.Column("first_seq", sa.BigInteger, nullable=False),
        sa.Column("last_ms", sa.BigInteger, nullable=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("entries", sa.Text, nullable=False),
        sa.Column("applied_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("batch", name=op.f("pk_applied_batches")),
    )
    op.create_index("ix_applied_batches_stream_last", "applied_batches", ["stream", "last_ms", "last_seq"])
    op.create_table(
        "monitor_counters",
        sa.Column("name", sa.String(_NAME), nullable=False),
        sa.Column("count", sa.BigInteger, nullable=False),
        sa.Column("text", sa.String(_NAME), nullable=False, server_default=sa.text("''")),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_monitor_counters")),
    )


def downgrade() -> None:
    for table in (
        "monitor_counters",
        "applied_batches",
        "latency_minutes",
        "decision_minutes",
        "offer_minutes",
    ):
        op.drop_table(table)
