"""The shared SQL layer: engines for SQLite and PostgreSQL, and schema migrations run by each service.

Every service that keeps SQL state (config, ingest, trainer, monitor) builds its engine with
`create_database_engine` and, at start, brings its schema up to date with `apply_migrations`. Each
service has its own Alembic history and its own version table (`alembic_version_<service>`), so
several services can share one PostgreSQL database. Nobody runs `alembic upgrade` by hand.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command, context
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection, Dialect, Engine

logger = logging.getLogger(__name__)

# One naming convention for every service's MetaData, so constraint names are stable and
# migrations can name what they drop or alter.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SQLITE_BUSY_TIMEOUT_MS = 5000
POSTGRESQL_CONNECT_TIMEOUT_S = 10
# How long a starting service waits for another process that is migrating the same database.
MIGRATION_LOCK_TIMEOUT_S = 60.0

_SQLITE_DRIVERS = {"sqlite", "sqlite+pysqlite"}
_POSTGRESQL_DRIVERS = {"postgresql", "postgres", "postgresql+psycopg"}
_SUPPORTED = "sqlite:///path/to/file.db, sqlite:// (in memory) or postgresql+psycopg://user@host/db"
# Set on a Connection to make its next BEGIN on SQLite a BEGIN IMMEDIATE waiting up to this many ms.
_SQLITE_WRITE_LOCK_OPTION = "liveloop_sqlite_write_lock_timeout_ms"
_PASSWORD_IN_URL = re.compile(r"(://[^:/@]*):[^@]*@")
# Alembic's `context` and `op` are process-global proxies: one migration at a time per process.
_PROCESS_MIGRATION_LOCK = threading.Lock()


def redact_database_url(url: str) -> str:
    """The URL with any password replaced by `***`, for messages and logs."""
    return _PASSWORD_IN_URL.sub(r"\1:***@", url)


def normalize_database_url(url: str) -> sa.URL:
    """Parse a database URL and pick the driver liveloop uses (psycopg 3 for PostgreSQL).

    Raises ValueError, naming the scheme, for anything but SQLite and PostgreSQL.
    """
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        # Not echoed: where a password sits in an unparsable string cannot be known.
        scheme = url.split("://", 1)[0] if "://" in url else None
        raise ValueError(f"cannot parse database URL (scheme {scheme!r}); expected {_SUPPORTED}") from None
    if parsed.drivername in _SQLITE_DRIVERS:
        return parsed
    if parsed.drivername in _POSTGRESQL_DRIVERS:
        return parsed.set(drivername="postgresql+psycopg")
    raise ValueError(
        f"unsupported database URL scheme {parsed.drivername!r} in "
        f"{parsed.render_as_string(hide_password=True)!r}; expected {_SUPPORTED}"
    )


def sqlite_file_path(url: sa.URL) -> Path | None:
    """The file behind a SQLite URL, or None for an in-memory or `file:` URI database."""
    database = url.database
    if not database or database == ":memory:" or url.query.get("uri"):
        return None
    return Path(database)


def create_database_engine(url: str) -> Engine:
    """An Engine for `sqlite:///path`, `sqlite://` or a PostgreSQL URL (always driven by psycopg 3).

    SQLite: the parent directory is created; every connection gets WAL, foreign keys and a busy
    timeout, and transactions are real (BEGIN is emitted by SQLAlchemy, so DDL is transactional).
    PostgreSQL: connections are pinged before use and connecting has a timeout.
    """
    parsed = normalize_database_url(url)
    if parsed.drivername in _SQLITE_DRIVERS:
        path = sqlite_file_path(parsed)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed)
        sa.event.listen(engine, "connect", _configure_sqlite_connection)
        sa.event.listen(engine, "begin", _begin_sqlite_transaction)
        return engine
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in parsed.query:
        connect_args["connect_timeout"] = POSTGRESQL_CONNECT_TIMEOUT_S
    return sa.create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)


def _configure_sqlite_connection(dbapi_connection: Any, _connection_record: Any) -> None:
    # Take BEGIN away from the sqlite3 module (its legacy mode never begins before DDL or SELECT);
    # _begin_sqlite_transaction emits it instead.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # busy_timeout first, so switching to WAL waits for a concurrent opener instead of failing.
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _begin_sqlite_transaction(connection: Connection) -> None:
    write_lock_timeout_ms = connection.get_execution_options().get(_SQLITE_WRITE_LOCK_OPTION)
    if write_lock_timeout_ms is None:
        connection.exec_driver_sql("BEGIN")
        return
    # Take the write lock up front: a deferred transaction that reads and then writes fails
    # at once with SQLITE_BUSY when another writer got there first.
    connection.exec_driver_sql(f"PRAGMA busy_timeout = {int(write_lock_timeout_ms)}")
    try:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    finally:
        connection.exec_driver_sql(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")


@contextmanager
def write_transaction(
    engine: Engine, *, lock_timeout_s: float = SQLITE_BUSY_TIMEOUT_MS / 1000
) -> Iterator[Connection]:
    """A transaction that will write: committed on success, rolled back on any exception.

    On SQLite it holds the database write lock from its first statement (BEGIN IMMEDIATE, waiting
    up to `lock_timeout_s` for other writers), so read-then-write sequences cannot be overtaken.
    Elsewhere it is an ordinary transaction.
    """
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            connection.execution_options(**{_SQLITE_WRITE_LOCK_OPTION: int(lock_timeout_s * 1000)})
        with connection.begin():
            yield connection


def alembic_config(
    migrations_package: str, *, version_table: str, connection: Connection | None = None
) -> Config:
    """An Alembic Config for a service's migrations package, built in code (no alembic.ini).

    `connection` and `version_table` reach the package's env.py through `config.attributes`.
    """
    spec = importlib.util.find_spec(migrations_package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"migrations package {migrations_package!r} is not an importable package")
    script_location = next(iter(spec.submodule_search_locations))
    config = Config()
    # Config values go through ConfigParser interpolation, where % is special.
    config.set_main_option("script_location", script_location.replace("%", "%%"))
    config.attributes["version_table"] = version_table
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def apply_migrations(
    engine: Engine,
    migrations_package: str,
    *,
    version_table: str,
    lock_timeout_s: float = MIGRATION_LOCK_TIMEOUT_S,
) -> str:
    """Bring the database up to the newest revision of `migrations_package`; returns that revision.

    Safe when several processes start at once: on PostgreSQL the upgrade holds a transaction-level
    advisory lock keyed by the version table, on SQLite the database write lock (BEGIN IMMEDIATE).
    The whole upgrade is one transaction on both, so a failing migration leaves nothing behind.
    """
    with _PROCESS_MIGRATION_LOCK, write_transaction(engine, lock_timeout_s=lock_timeout_s) as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(
                sa.select(sa.func.set_config("lock_timeout", f"{int(lock_timeout_s * 1000)}ms", True))
            )
            connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_advisory_lock_key(version_table))))
        before = _revision_on(connection, version_table)
        command.upgrade(
            alembic_config(migrations_package, version_table=version_table, connection=connection), "head"
        )
        after = _revision_on(connection, version_table)
    if after is None:
        raise RuntimeError(f"migrations package {migrations_package!r} has no revisions")
    if before != after:
        logger.info("database schema %s migrated from %s to %s", version_table, before, after)
    return after


def current_revision(engine: Engine, version_table: str) -> str | None:
    """The revision recorded in `version_table`, or None when nothing has been migrated yet."""
    with engine.connect() as connection:
        return _revision_on(connection, version_table)


def run_migrations_online(target_metadata: sa.MetaData | None = None) -> None:
    """The body of every service's migrations/env.py.

    The connection and version table come from `config.attributes`, set by `apply_migrations`.
    The upgrade joins the caller's transaction, so it commits or rolls back as one.
    """
    if context.is_offline_mode():
        raise RuntimeError("offline (--sql) migrations are not supported; use apply_migrations()")
    attributes = context.config.attributes
    connection = attributes.get("connection")
    if not isinstance(connection, Connection):
        raise RuntimeError("no connection in config.attributes; run migrations through apply_migrations()")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=attributes["version_table"],
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


class UtcDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores no offset, so it is added back).

    Naive datetimes are refused rather than guessed at.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()}; pass an aware (UTC) datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _revision_on(connection: Connection, version_table: str) -> str | None:
    migration_context = MigrationContext.configure(connection, opts={"version_table": version_table})
    return migration_context.get_current_revision()


def _advisory_lock_key(version_table: str) -> int:
    digest = hashlib.sha256(f"liveloop:migrations:{version_table}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)
