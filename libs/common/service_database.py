"""Opening a service's SQL store at start: connect, migrate, and fail with the setting named."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from libs.common.database import apply_migrations, create_database_engine, redact_database_url
from libs.common.errors import InvalidArgument, Unavailable


async def open_service_database(url: str, *, service: str, migrations_package: str | None = None) -> Engine:
    """An engine whose schema is at the newest migration of `migrations_package` (if any)."""
    try:
        engine = create_database_engine(url)
    except ValueError as exc:
        raise InvalidArgument(str(exc), field="database_url") from None

    def prepare() -> None:
        if migrations_package is None:
            with engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))
        else:
            apply_migrations(engine, migrations_package, version_table=f"alembic_version_{service}")

    try:
        await asyncio.to_thread(prepare)
    except SQLAlchemyError as exc:
        engine.dispose()
        original = getattr(exc, "orig", None)
        reason = str(original) if original is not None else str(exc)
        raise Unavailable(
            f"cannot open {redact_database_url(url)}: {reason.splitlines()[0]}", field="database_url"
        ) from None
    return engine
