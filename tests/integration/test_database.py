"""The shared SQL layer against real databases: SQLite files and PostgreSQL (see conftest.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from libs.common.database import (
    apply_migrations,
    create_database_engine,
    current_revision,
    write_transaction,
)
from services.config.core import schema

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REPO_ROOT = Path(__file__).resolve().parents[2]
HEAD = "0001"


def migrate(engine: sa.Engine) -> str:
    return apply_migrations(engine, schema.MIGRATIONS_PACKAGE, version_table=schema.VERSION_TABLE)


def assert_config_schema(engine: sa.Engine) -> None:
    inspector = sa.inspect(engine)
    assert {"deployment_revisions", "config_audit", schema.VERSION_TABLE} <= set(inspector.get_table_names())
    assert [c["name"] for c in inspector.get_columns("deployment_revisions")] == [
        "revision",
        "deployment",
        "spec",
        "content_sha256",
        "author",
        "created_at",
        "change_kind",
        "rolled_back_from",
        "message",
    ]
    indexes = {ix["name"]: ix for ix in inspector.get_indexes("deployment_revisions")}
    assert indexes["ix_deployment_revisions_deployment_revision"]["column_names"] == [
        "deployment",
        "revision",
    ]
    assert indexes["ix_deployment_revisions_deployment_revision"]["unique"]
    assert indexes["ix_deployment_revisions_deployment_content_sha256"]["column_names"] == [
        "deployment",
        "content_sha256",
    ]
    assert [c["name"] for c in inspector.get_columns("config_audit")] == [
        "id",
        "revision",
        "actor",
        "action",
        "detail",
        "created_at",
    ]
    with engine.connect() as connection:
        versions = connection.execute(sa.text(f"SELECT version_num FROM {schema.VERSION_TABLE}")).all()
    assert versions == [(HEAD,)]


def revision_row(revision: int, **overrides: object) -> dict[str, object]:
    row: dict[str, object] = {
        "revision": revision,
        "deployment": "recommender",
        "spec": '{"offers": []}',
        "content_sha256": "0" * 64,
        "author": "tester",
        "change_kind": schema.CHANGE_KIND_PUBLISH,
    }
    row.update(overrides)
    return row


def count_rows(engine: sa.Engine, table: sa.Table) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(sa.select(sa.func.count()).select_from(table)) or 0)


def test_migrations_create_the_config_tables_and_report_the_head(database_engine: sa.Engine) -> None:
    assert current_revision(database_engine, schema.VERSION_TABLE) is None

    assert migrate(database_engine) == HEAD

    assert current_revision(database_engine, schema.VERSION_TABLE) == HEAD
    assert_config_schema(database_engine)


def test_schema_module_matches_the_migrations(database_engine: sa.Engine) -> None:
    migrate(database_engine)
    with database_engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "version_table": schema.VERSION_TABLE}
        )
        assert compare_metadata(context, schema.metadata) == []


def test_applying_migrations_again_is_a_no_op(database_engine: sa.Engine) -> None:
    migrate(database_engine)
    with write_transaction(database_engine) as connection:
        connection.execute(sa.insert(schema.deployment_revisions), revision_row(1))

    assert migrate(database_engine) == HEAD

    assert count_rows(database_engine, schema.deployment_revisions) == 1
    assert_config_schema(database_engine)


def test_concurrent_processes_migrate_a_fresh_database_once(database_url: str) -> None:
    # Each process gets ready (imports, a first connection), then all are released at once.
    child = textwrap.dedent(
        """
        import sys
        from libs.common.database import apply_migrations, create_database_engine
        from services.config.core import schema
        engine = create_database_engine(sys.argv[1])
        engine.connect().close()
        print("ready", flush=True)
        sys.stdin.readline()
        print(apply_migrations(engine, schema.MIGRATIONS_PACKAGE, version_table=schema.VERSION_TABLE))
        """
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", child, database_url],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready", process.stderr
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        results = [process.communicate(timeout=45) for process in processes]
    finally:
        for process in processes:
            process.kill()
            process.wait()

    for process, (stdout, stderr) in zip(processes, results, strict=True):
        assert process.returncode == 0, stderr
        assert stdout.strip() == HEAD
    engine = create_database_engine(database_url)
    try:
        assert_config_schema(engine)
    finally:
        engine.dispose()


def test_concurrent_threads_migrate_a_fresh_database_once(database_url: str) -> None:
    engines = [create_database_engine(database_url) for _ in range(3)]
    start = threading.Barrier(len(engines))
    results: list[str] = []
    errors: list[BaseException] = []

    def run(engine: sa.Engine) -> None:
        try:
            start.wait()
            results.append(migrate(engine))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(engine,)) for engine in engines]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=45)
        assert errors == []
        assert results == [HEAD] * len(engines)
        assert_config_schema(engines[0])
    finally:
        for engine in engines:
            engine.dispose()


def test_a_transaction_that_fails_midway_leaves_nothing_behind(database_engine: sa.Engine) -> None:
    migrate(database_engine)

    def publish_then_collide() -> None:
        with write_transaction(database_engine) as connection:
            connection.execute(sa.insert(schema.deployment_revisions), revision_row(1))
            connection.execute(
                sa.insert(schema.config_audit), {"revision": 1, "actor": "t", "action": "publish"}
            )
            connection.execute(sa.insert(schema.deployment_revisions), revision_row(1))  # same revision

    def publish_then_fail_validation() -> None:
        with database_engine.begin() as connection:
            connection.execute(sa.insert(schema.deployment_revisions), revision_row(2))
            raise RuntimeError("validation failed")

    with pytest.raises(sa.exc.IntegrityError):
        publish_then_collide()
    with pytest.raises(RuntimeError, match="validation failed"):
        publish_then_fail_validation()

    assert count_rows(database_engine, schema.deployment_revisions) == 0
    assert count_rows(database_engine, schema.config_audit) == 0


def test_a_failing_migration_leaves_nothing_behind(
    database_engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = f"broken_migrations_{uuid.uuid4().hex[:8]}"
    versions = tmp_path / package / "versions"
    versions.mkdir(parents=True)
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "env.py").write_text(
        "from libs.common.database import run_migrations_online\nrun_migrations_online()\n"
    )
    (versions / "0001_half_done.py").write_text(
        textwrap.dedent(
            """
            import sqlalchemy as sa
            from alembic import op
            revision = "0001"
            down_revision = None
            def upgrade():
                op.create_table("half_done", sa.Column("id", sa.Integer, primary_key=True))
                op.execute("INSERT INTO half_done (id) VALUES (1)")
                op.execute("SELECT * FROM no_such_table")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(sa.exc.DBAPIError):
        apply_migrations(database_engine, package, version_table="alembic_version_broken")

    assert sa.inspect(database_engine).get_table_names() == []
    assert current_revision(database_engine, "alembic_version_broken") is None


def test_constraints_are_enforced(database_engine: sa.Engine) -> None:
    migrate(database_engine)
    bad_rows = [
        (schema.config_audit, {"revision": 999, "actor": "t", "action": "publish"}),  # no such revision
        (schema.deployment_revisions, revision_row(1, change_kind="rename")),  # unknown kind
        (schema.deployment_revisions, revision_row(1, change_kind=schema.CHANGE_KIND_ROLLBACK)),  # no source
    ]
    for table, row in bad_rows:
        with pytest.raises(sa.exc.IntegrityError), database_engine.begin() as connection:
            connection.execute(sa.insert(table), row)


def test_timestamps_come_back_as_utc(database_engine: sa.Engine) -> None:
    migrate(database_engine)
    written = datetime(2025, 3, 4, 5, 6, 7, tzinfo=timezone(timedelta(hours=2)))
    with database_engine.begin() as connection:
        connection.execute(sa.insert(schema.deployment_revisions), revision_row(1, created_at=written))
        connection.execute(sa.insert(schema.deployment_revisions), revision_row(2))  # server default
    with database_engine.connect() as connection:
        explicit, defaulted = connection.scalars(
            sa.select(schema.deployment_revisions.c.created_at).order_by(
                schema.deployment_revisions.c.revision
            )
        ).all()
    assert explicit == written
    assert explicit.tzinfo is UTC
    assert defaulted.tzinfo is UTC
    assert abs(datetime.now(UTC) - defaulted) < timedelta(minutes=5)

    with pytest.raises(sa.exc.StatementError, match="naive datetime"), database_engine.begin() as connection:
        connection.execute(
            sa.insert(schema.deployment_revisions), revision_row(3, created_at=datetime(2025, 1, 1))
        )


def test_sqlite_creates_the_parent_directory_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "there" / "config.db"
    engine = create_database_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
        assert path.is_file()
    finally:
        engine.dispose()


def test_sqlite_in_memory_database_migrates() -> None:
    engine = create_database_engine("sqlite://")
    try:
        assert migrate(engine) == HEAD
        assert current_revision(engine, schema.VERSION_TABLE) == HEAD
    finally:
        engine.dispose()


def test_sqlite_write_transactions_take_the_write_lock_up_front(tmp_path: Path) -> None:
    engine = create_database_engine(f"sqlite:///{tmp_path / 'locks.db'}")
    holding, release = threading.Event(), threading.Event()

    def hold_the_write_lock() -> None:
        with write_transaction(engine):
            holding.set()
            release.wait(timeout=30)

    holder = threading.Thread(target=hold_the_write_lock)
    holder.start()
    try:
        assert holding.wait(timeout=30)
        # Only BEGIN, no write yet: a deferred BEGIN would not wait here, BEGIN IMMEDIATE must.
        with (
            pytest.raises(sa.exc.OperationalError, match="locked"),
            write_transaction(engine, lock_timeout_s=0.2),
        ):
            pass
        with engine.connect() as reader:  # WAL: readers are not blocked by the writer
            assert reader.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        release.set()
        holder.join(timeout=30)
        engine.dispose()


def test_an_unknown_url_scheme_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unsupported database URL scheme 'mysql'") as raised:
        create_database_engine("mysql://admin:hunter2@db.example/liveloop")
    assert "hunter2" not in str(raised.value)
