"""SQL tables of the trainer (SQLAlchemy Core): training jobs and the model registry.

Mirrors migrations/versions/; a change here needs a new migration (a test compares the two).
"""

import sqlalchemy as sa

from libs.common.database import NAMING_CONVENTION, UtcDateTime

MIGRATIONS_PACKAGE = "services.trainer.core.migrations"
VERSION_TABLE = "alembic_version_trainer"

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_JOB_STATES = frozenset({"succeeded", "failed", "cancelled"})

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

# One row per training job; the state machine is queued -> running -> succeeded | failed | cancelled
# (queued -> cancelled too). Rows outlive the trainer process: at start, a job the trainer service
# left `running` when it died is marked failed; a batch run's job, once its heartbeat is stale.
training_jobs = sa.Table(
    "training_jobs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("model_name", sa.String(200), nullable=False),
    sa.Column("spec", sa.Text, nullable=False),  # the validated TrainingJobSpec, canonical JSON
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("epochs_done", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("max_epochs", sa.Integer, nullable=False),
    sa.Column("progress", sa.Float, nullable=False, server_default=sa.text("0")),  # 0..1
    sa.Column("error", sa.Text, nullable=False, server_default=sa.text("''")),
    sa.Column("author", sa.String(200), nullable=False, server_default=sa.text("''")),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("started_at", UtcDateTime),
    sa.Column("finished_at", UtcDateTime),
    sa.Column("model_version", sa.BigInteger),  # the registered version, once succeeded
    # Who runs it: "service" (the trainer service) or "batch:<name>" (services.trainer.batch), and
    # when that runner last said it still does (every JOB_HEARTBEAT_SECONDS while running).
    sa.Column("runner", sa.String(200)),
    sa.Column("heartbeat_at", UtcDateTime),
    sa.CheckConstraint(
        "state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name="state_known"
    ),
    sa.Index("ix_training_jobs_state", "state"),
    sa.Index("ix_training_jobs_model_name_created_at", "model_name", "created_at"),
)

# What WatchJob streams: one row per epoch and per state change, numbered per job from 1.
training_job_events = sa.Table(
    "training_job_events",
    metadata,
    sa.Column("job_id", sa.String(64), sa.ForeignKey("training_jobs.id"), primary_key=True),
    sa.Column("sequence", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("event", sa.Text, nullable=False),  # JSON
    sa.Column("created_at", UtcDateTime, nullable=False),
)

# A registered model: a name whose versions are numbered 1, 2, ... by the registry.
models = sa.Table(
    "models",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("latest_version", sa.BigInteger, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
)

# One immutable row per trained version, with its held-out metrics and its lineage.
model_versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("name", sa.String(200), sa.ForeignKey("models.name"), primary_key=True),
    sa.Column("version", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("model_type", sa.String(32), nullable=False),
    sa.Column("auc", sa.Float),  # null when the test split held one class only
    sa.Column("log_loss", sa.Float, nullable=False),
    sa.Column("calibration_error", sa.Float, nullable=False),
    sa.Column("brier_score", sa.Float, nullable=False),
    sa.Column("test_rows", sa.BigInteger, nullable=False),
    sa.Column("metrics", sa.Text, nullable=False),  # JSON: every metric, including the above
    sa.Column("features", sa.Text, nullable=False),  # JSON list of {name, dtype, encoding}
    sa.Column("label", sa.String(63), nullable=False),
    sa.Column("training_set", sa.Text, nullable=False),  # table name or query
    sa.Column("data_fingerprint", sa.String(64), nullable=False),
    sa.Column("code_version", sa.String(200), nullable=False),
    sa.Column("artifact_uri", sa.Text, nullable=False),
    sa.Column("checksum", sa.String(64), nullable=False),  # SHA-256 of the artifact's manifest
    sa.Column("hyperparameters", sa.Text, nullable=False),  # JSON
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("training_rows", sa.BigInteger, nullable=False),
    sa.Column("description", sa.Text, nullable=False, server_default=sa.text("''")),
    sa.Column("job_id", sa.String(64), sa.ForeignKey("training_jobs.id"), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    # JSON: the TrainingReference (libs.common.distribution_drift) drift monitoring compares served
    # inputs and scores with; null for versions registered before the trainer recorded one.
    sa.Column("training_reference", sa.Text),
    sa.Index("ix_model_versions_job_id", "job_id"),
)
