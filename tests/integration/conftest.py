"""Fixtures for integration tests: a fresh, empty SQL database per test, on SQLite and PostgreSQL.

PostgreSQL is the server at 127.0.0.1:5432 (trust auth) unless LIVELOOP_TEST_POSTGRESQL_URL names
another (an admin URL allowed to CREATE DATABASE). Tests on it are skipped only when nothing answers
there; a server that answers but refuses us is a failure.
"""

from __future__ import annotations

import functools
import os
import socket
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

from libs.common.database import create_database_engine

_DEFAULT_POSTGRESQL_URLS = (
    "postgresql://postgres@127.0.0.1:5432/test",
    "postgresql://root@127.0.0.1:5432/test",
)
_CONNECT_TIMEOUT_S = 2


@functools.cache
def _probe_postgresql() -> tuple[str | None, str]:
    """(admin URL, "") for a reachable PostgreSQL that lets us in, or (None, why not) if none answers.

    Cached, so a missing server costs the connect timeout once per session, not once per test.
    """
    configured = os.environ.get("LIVELOOP_TEST_POSTGRESQL_URL")
    candidates = (configured,) if configured else _DEFAULT_POSTGRESQL_URLS
    first = sa.make_url(candidates[0])
    host, port = first.host or "127.0.0.1", first.port or 5432
    try:
        socket.create_connection((host, port), _CONNECT_TIMEOUT_S).close()
    except OSError as error:
        return None, f"no PostgreSQL answers at {host}:{port} ({error}); PostgreSQL tests skipped"
    refusals = []
    for candidate in candidates:
        try:
            with psycopg.connect(candidate, connect_timeout=_CONNECT_TIMEOUT_S, autocommit=True) as conn:
                conn.execute("SELECT 1")
            return candidate, ""
        except psycopg.OperationalError as error:
            refusals.append(f"{sa.make_url(candidate).render_as_string(hide_password=True)}: {error}")
    raise RuntimeError(f"PostgreSQL at {host}:{port} answers but refuses every test login: {refusals}")


def _postgresql_admin_url() -> str:
    admin_url, why_not = _probe_postgresql()
    if admin_url is None:
        print(why_not)
        pytest.skip(why_not)
    return admin_url


@pytest.fixture
def postgresql_database_url() -> Iterator[str]:
    """A new, uniquely named PostgreSQL database, dropped (even with connections left) afterwards."""
    admin_url = _postgresql_admin_url()
    name = f"liveloop_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(admin_url, connect_timeout=_CONNECT_TIMEOUT_S, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_url, connect_timeout=_CONNECT_TIMEOUT_S, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A URL of a fresh, empty database: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'liveloop.db'}"
    return str(request.getfixturevalue("postgresql_database_url"))


@pytest.fixture
def database_engine(database_url: str) -> Iterator[sa.Engine]:
    """An engine on `database_url`, disposed after the test."""
    engine = create_database_engine(database_url)
    try:
        yield engine
    finally:
        engine.dispose()
