"""Alembic migrations of the config store, applied at start by libs.common.database.apply_migrations."""
