"""SQL tables of the config store (SQLAlchemy Core), mirroring migrations/versions/.

A change here needs a new migration in migrations/versions/; tests compare the two.
"""

import sqlalchemy as sa

from libs.common.database import NAMING_CONVENTION, UtcDateTime

MIGRATIONS_PACKAGE = "services.config.core.migrations"
VERSION_TABLE = "alembic_version_config"

CHANGE_KIND_PUBLISH = "publish"
CHANGE_KIND_ROLLBACK = "rollback"
CHANGE_KIND_DELETE = "delete"  # the deployment leaves the head; `spec` is empty

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

# One row per immutable snapshot of a deployment spec. `revision` is global across deployments and
# assigned by the publisher (previous maximum + 1, inside the publishing transaction) rather than by
# a sequence, so revisions are gapless and become visible in order: Watch replays "everything after
# revision N" and must never skip one that commits late.
deployment_revisions = sa.Table(
    "deployment_revisions",
    metadata,
    sa.Column("revision", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("deployment", sa.String(200), nullable=False),
    sa.Column("spec", sa.Text, nullable=False),  # the validated spec, as JSON text
    sa.Column("content_sha256", sa.String(64), nullable=False),  # of `spec`, to spot no-op publishes
    sa.Column("author", sa.String(200), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False, server_default=sa.text("CURRENT_TIMESTAMP")),
    sa.Column("change_kind", sa.String(16), nullable=False),  # publish | rollback | delete
    # A rollback republishes an older payload under a new revision; this names the older one.
    sa.Column("rolled_back_from", sa.BigInteger, sa.ForeignKey("deployment_revisions.revision")),
    sa.Column("message", sa.Text, nullable=False, server_default=sa.text("''")),  # why, from the author
    sa.CheckConstraint(
        f"change_kind IN ('{CHANGE_KIND_PUBLISH}', '{CHANGE_KIND_ROLLBACK}', '{CHANGE_KIND_DELETE}')",
        name="change_kind",
    ),
    sa.CheckConstraint(
        f"(change_kind = '{CHANGE_KIND_ROLLBACK}') = (rolled_back_from IS NOT NULL)",
        name="rollback_has_source",
    ),
    sa.Index("ix_deployment_revisions_deployment_revision", "deployment", "revision", unique=True),
    sa.Index("ix_deployment_revisions_deployment_content_sha256", "deployment", "content_sha256"),
)

# Who did what to the config store, including refused publishes (then `revision` is null).
config_audit = sa.Table(
    "config_audit",
    metadata,
    sa.Column(
        "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
    ),
    sa.Column("revision", sa.BigInteger, sa.ForeignKey("deployment_revisions.revision")),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("detail", sa.Text, nullable=False, server_default=sa.text("'{}'")),  # JSON text
    sa.Column("created_at", UtcDateTime, nullable=False, server_default=sa.text("CURRENT_TIMESTAMP")),
    sa.Index("ix_config_audit_revision", "revision"),
    sa.Index("ix_config_audit_created_at", "created_at"),
)
