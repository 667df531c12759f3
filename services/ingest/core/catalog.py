"""The offline store's own bookkeeping (SQLAlchemy Core), mirroring migrations/versions/."""

import sqlalchemy as sa

from libs.common.database import NAMING_CONVENTION, UtcDateTime

MIGRATIONS_PACKAGE = "services.ingest.core.migrations"

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

# Every table liveloop loaded or built: kind (raw, feature_view, training_set), key, schema.
tables = sa.Table(
    "ll_tables",
    metadata,
    sa.Column("name", sa.String(63), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("key_columns", sa.Text, nullable=False),  # JSON list
    sa.Column("event_time_column", sa.String(63), nullable=False, server_default=sa.text("''")),
    sa.Column("columns", sa.Text, nullable=False),  # JSON list of {name, type}
    sa.Column("fingerprint", sa.String(64), nullable=False, server_default=sa.text("''")),
    sa.Column("row_count", sa.BigInteger, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
)

# One row per committed load; a source fingerprint loaded before into a table is not loaded twice.
loads = sa.Table(
    "ll_loads",
    metadata,
    sa.Column(
        "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
    ),
    sa.Column("table_name", sa.String(63), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("mode", sa.String(16), nullable=False),
    sa.Column("rows_written", sa.BigInteger, nullable=False),
    sa.Column("rows_rejected", sa.BigInteger, nullable=False),
    sa.Column("loaded_at", UtcDateTime, nullable=False),
    sa.Index("ix_ll_loads_table_name_fingerprint", "table_name", "fingerprint"),
)

# Where incremental materialization into the online store got to, per feature view.
materializations = sa.Table(
    "ll_materializations",
    metadata,
    sa.Column("feature_view", sa.String(63), primary_key=True),
    sa.Column("watermark", sa.Text, nullable=False),
    sa.Column("entities", sa.BigInteger, nullable=False),
    sa.Column("materialized_at", UtcDateTime, nullable=False),
)

# Feature views declared by ApplyFeatures: each view's definition (YAML) and its version, which
# increases when the definition changes.
feature_views = sa.Table(
    "ll_feature_views",
    metadata,
    sa.Column("name", sa.String(63), primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("definition_hash", sa.String(64), nullable=False),
    sa.Column("definition", sa.Text, nullable=False),
    sa.Column("source_table", sa.String(63), nullable=False),
    sa.Column("applied_at", UtcDateTime, nullable=False),
)
