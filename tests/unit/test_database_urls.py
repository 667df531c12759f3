"""URL handling of the shared SQL layer; nothing here connects to a database."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from libs.common.database import (
    create_database_engine,
    normalize_database_url,
    redact_database_url,
    sqlite_file_path,
)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:pw@db:5432/liveloop",
        "postgres://app:pw@db:5432/liveloop",
        "postgresql+psycopg://app:pw@db:5432/liveloop",
    ],
)
def test_postgresql_urls_use_psycopg_3(url: str) -> None:
    normalized = normalize_database_url(url)
    assert normalized.drivername == "postgresql+psycopg"
    assert (normalized.username, normalized.password, normalized.host, normalized.port) == (
        "app",
        "pw",
        "db",
        5432,
    )
    assert normalized.database == "liveloop"


@pytest.mark.parametrize("url", ["sqlite:///data/config.db", "sqlite:////abs/config.db", "sqlite://"])
def test_sqlite_urls_are_kept(url: str) -> None:
    assert normalize_database_url(url).render_as_string() == url


@pytest.mark.parametrize(
    ("url", "scheme"),
    [
        ("mysql://root:secret@db/liveloop", "mysql"),
        ("postgresql+psycopg2://app:secret@db/liveloop", "postgresql+psycopg2"),
        ("redis://:secret@localhost:6379/0", "redis"),
    ],
)
def test_unknown_schemes_are_named_and_passwords_hidden(url: str, scheme: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"unsupported database URL scheme '{scheme}'")) as raised:
        normalize_database_url(url)
    assert "secret" not in str(raised.value)


def test_an_unparsable_url_is_a_value_error_without_the_password() -> None:
    with pytest.raises(ValueError, match="cannot parse database URL") as raised:
        normalize_database_url("not a url, user:secret@host")
    assert "secret" not in str(raised.value)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("postgresql://app:s3cr%40t@db/liveloop", "postgresql://app:***@db/liveloop"),
        ("postgresql://app@db/liveloop", "postgresql://app@db/liveloop"),
        ("sqlite:///data/config.db", "sqlite:///data/config.db"),
    ],
)
def test_redact_database_url(url: str, redacted: str) -> None:
    assert redact_database_url(url) == redacted


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///data/config.db", Path("data/config.db")),
        ("sqlite:////var/lib/liveloop/config.db", Path("/var/lib/liveloop/config.db")),
        ("sqlite://", None),
        ("sqlite:///:memory:", None),
        ("sqlite:///file:config.db?mode=ro&uri=true", None),
    ],
)
def test_sqlite_file_path(url: str, path: Path | None) -> None:
    assert sqlite_file_path(normalize_database_url(url)) == path


def test_postgresql_engine_uses_psycopg_and_pings() -> None:
    engine = create_database_engine("postgres://app@db.invalid/liveloop")  # creating does not connect
    try:
        assert engine.dialect.driver == "psycopg"
        assert engine.pool._pre_ping
    finally:
        engine.dispose()


def test_create_database_engine_rejects_unknown_schemes() -> None:
    with pytest.raises(ValueError, match="'oracle'"):
        create_database_engine("oracle://scott:tiger@db/orcl")
