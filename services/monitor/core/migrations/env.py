"""Alembic environment of the monitor's store; runs inside libs.common.database.apply_migrations."""

from libs.common.database import run_migrations_online
from services.monitor.core.schema import metadata

run_migrations_online(target_metadata=metadata)
