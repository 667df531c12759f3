"""Alembic environment of the ingest catalog; runs inside libs.common.database.apply_migrations."""

from libs.common.database import run_migrations_online
from services.ingest.core.catalog import metadata

run_migrations_online(target_metadata=metadata)
