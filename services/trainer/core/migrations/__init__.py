"""Alembic migrations of the trainer's store, applied at start by libs.common.database.apply_migrations."""
