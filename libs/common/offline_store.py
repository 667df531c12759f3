"""Reading the offline store: a read-only engine, and the catalog ingest keeps of what it wrote.

Ingest writes tables into the offline store and records each in its `ll_tables` catalog (column
types, key columns, event-time column; services/ingest/core/catalog.py owns that table's schema and
migrations). The trainer reads training sets from it, the monitor reads other systems' decision
logs from it; both read through this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from libs.common.database import UtcDateTime, create_database_engine, redact_database_url
from libs.common.errors import InvalidArgument, Unavailable

CATALOG_TABLE = "ll_tables"
# The SQL type a column of each catalog type is read as.
CATALOG_SQL_TYPES: dict[str, Any] = {
    "int64": sa.BigInteger(),
    "float64": sa.Float(precision=53),
    "bool": sa.Boolean(),
    "string": sa.Text(),
    "timestamp": UtcDateTime(),
    "date": sa.Date(),
    "json": sa.Text(),
}


@dataclass(frozen=True)
class CatalogEntry:
    """What the catalog records of one table: its columns as {name, type} and its key columns."""

    columns: list[dict[str, str]]
    key_columns: list[str]
    event_time_column: str


def open_offline_store(url: str) -> Engine:
    """An engine on the offline store that can only read (a query in a spec must not write)."""
    try:
        engine = create_database_engine(url)
    except ValueError as exc:
        raise InvalidArgument(str(exc), field="offline_store_url") from None

    def read_only(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            if engine.dialect.name == "sqlite":
                cursor.execute("PRAGMA query_only = ON")
            else:
                cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        finally:
            cursor.close()
        if engine.dialect.name != "sqlite":
            dbapi_connection.commit()

    sa.event.listen(engine, "connect", read_only)
    return engine


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection; the store being unreachable is Unavailable, naming the (redacted) URL."""
    try:
        with engine.connect() as connection:
            yield connection
    except sa.exc.OperationalError as exc:
        reason = str(getattr(exc, "orig", exc)).splitlines()[0]
        raise Unavailable(
            f"cannot read the offline store at {redact_database_url(str(engine.url))}: {reason}",
            field="offline_store_url",
        ) from None


def quote(connection: Connection, name: str) -> str:
    """A column or table name quoted for this database."""
    return str(connection.dialect.identifier_preparer.quote(name))


def catalog_entry(connection: Connection, table: str) -> CatalogEntry | None:
    """The catalog's record of a table; None when ingest did not write it (or no catalog exists)."""
    if not sa.inspect(connection).has_table(CATALOG_TABLE):
        return None
    catalog = sa.table(
        CATALOG_TABLE,
        sa.column("name"),
        sa.column("columns"),
        sa.column("key_columns"),
        sa.column("event_time_column"),
    )
    row = connection.execute(
        sa.select(catalog.c.columns, catalog.c.key_columns, catalog.c.event_time_column).where(
            catalog.c.name == table
        )
    ).first()
    if row is None:
        return None
    return CatalogEntry(
        columns=[{"name": str(c["name"]), "type": str(c["type"])} for c in json.loads(row[0])],
        key_columns=[str(key) for key in json.loads(row[1])],
        event_time_column=str(row[2] or ""),
    )
