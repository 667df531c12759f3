"""SQL tables of the monitor (SQLAlchemy Core): per-minute rollups of the decision log, the
consumer's ledger of applied stream entries, its counters, and the alerts of the alert rules.

Mirrors migrations/versions/; a change here needs a new migration (a test compares the two).
A minute is the epoch second it starts at. Responses are rolled up into the minute, segment,
variant, revision and replica of the contact they answer, so uptake over a window is accepted /
impressions of the same decisions.
"""

import sqlalchemy as sa

from libs.common.database import NAMING_CONVENTION

MIGRATIONS_PACKAGE = "services.monitor.core.migrations"
VERSION_TABLE = "alembic_version_monitor"

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

_NAME = 200

# One row per minute x deployment x variant x segment x offer x revision x replica.
offer_minutes = sa.Table(
    "offer_minutes",
    metadata,
    sa.Column("minute", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("deployment", sa.String(_NAME), primary_key=True),
    sa.Column("variant", sa.String(_NAME), primary_key=True),
    sa.Column("segment", sa.String(_NAME), primary_key=True),
    sa.Column("offer", sa.String(_NAME), primary_key=True),
    sa.Column("revision", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("replica", sa.String(_NAME), primary_key=True),
    sa.Column("impressions", sa.BigInteger, nullable=False),
    sa.Column("explored_impressions", sa.BigInteger, nullable=False),
    sa.Column("accepted", sa.BigInteger, nullable=False),
    sa.Column("reward_sum", sa.Float, nullable=False),
    sa.Index("ix_offer_minutes_deployment_minute", "deployment", "minute"),
)

# One row per minute x deployment x variant x segment x revision x replica: what is counted per
# decision rather than per offer.
decision_minutes = sa.Table(
    "decision_minutes",
    metadata,
    sa.Column("minute", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("deployment", sa.String(_NAME), primary_key=True),
    sa.Column("variant", sa.String(_NAME), primary_key=True),
    sa.Column("segment", sa.String(_NAME), primary_key=True),
    sa.Column("revision", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("replica", sa.String(_NAME), primary_key=True),
    sa.Column("invocations", sa.BigInteger, nullable=False),
    sa.Column("explore_decisions", sa.BigInteger, nullable=False),
    sa.Column("responses", sa.BigInteger, nullable=False),
    sa.Column("late_responses", sa.BigInteger, nullable=False),
    sa.Column("duplicate_responses", sa.BigInteger, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),  # epoch seconds of the newest contact
    sa.Index("ix_decision_minutes_deployment_minute", "deployment", "minute"),
)

# Latency per minute x deployment x predictor RPC, as counts per log-spaced bucket (JSON object
# of bucket index -> calls; see rollups.LATENCY_BUCKETS), so quantiles merge over any window.
latency_minutes = sa.Table(
    "latency_minutes",
    metadata,
    sa.Column("minute", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("deployment", sa.String(_NAME), primary_key=True),
    sa.Column("method", sa.String(_NAME), primary_key=True),
    sa.Column("calls", sa.BigInteger, nullable=False),
    sa.Column("max_seconds", sa.Float, nullable=False),
    sa.Column("buckets", sa.Text, nullable=False),
)

# The stream entries each applied batch held, committed with the batch's rollups: an entry that is
# delivered again (a consumer died before acknowledging it, or the group was rewound) is found here
# and not counted twice. Rows at or below the watermark (monitor_counters 'watermark') are pruned.
applied_batches = sa.Table(
    "applied_batches",
    metadata,
    sa.Column("batch", sa.String(64), primary_key=True),
    sa.Column("stream", sa.String(_NAME), nullable=False),
    sa.Column("first_ms", sa.BigInteger, nullable=False),
    sa.Column("first_seq", sa.BigInteger, nullable=False),
    sa.Column("last_ms", sa.BigInteger, nullable=False),
    sa.Column("last_seq", sa.BigInteger, nullable=False),
    sa.Column("entries", sa.Text, nullable=False),  # the ids, "ms-seq" comma-separated
    sa.Column("applied_at", sa.Float, nullable=False),
    sa.Index("ix_applied_batches_stream_last", "stream", "last_ms", "last_seq"),
)

# Counters and marks of the consumer: 'watermark:<stream>' (every entry at or below it is applied
# or gone), 'trimmed:<stream>' (entries trimmed from the stream before the group read them),
# 'malformed:<kind>' (entries that could not be read).
monitor_counters = sa.Table(
    "monitor_counters",
    metadata,
    sa.Column("name", sa.String(_NAME), primary_key=True),
    sa.Column("count", sa.BigInteger, nullable=False),
    sa.Column("text", sa.String(_NAME), nullable=False, server_default=sa.text("''")),
)

# Alerts raised by the alert rules (alert_engine.py): one row per episode, from firing to resolved.
# `id` is the alert's fingerprint (rule, deployment, labels): the same in every episode of the same
# condition. Resolved rows are deleted after a retention.
alerts = sa.Table(
    "alerts",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("started_at", sa.Float, primary_key=True, autoincrement=False),  # epoch seconds
    sa.Column("rule", sa.String(_NAME), nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("deployment", sa.String(_NAME), nullable=False),
    sa.Column("severity", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # firing, resolved
    sa.Column("summary", sa.Text, nullable=False),
    sa.Column("labels", sa.Text, nullable=False),  # JSON object
    sa.Column("value", sa.Float, nullable=False),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("resolved_at", sa.Float, nullable=True),
    sa.Column("updated_at", sa.Float, nullable=False),  # the last evaluation that saw it firing
    sa.Index("ix_alerts_state_started_at", "state", "started_at"),
    sa.Index("ix_alerts_deployment_started_at", "deployment", "started_at"),
)
