"""The trainer's SQL side on SQLite and PostgreSQL: its schema, the checks a spec passes before a job
is queued, reading a training set, the job log and the model registry."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from libs.common.database import apply_migrations
from libs.common.errors import FailedPrecondition, InvalidArgument, NotFound
from libs.common.model_artifacts import MANIFEST_FILE
from libs.common.offline_store import open_offline_store
from libs.common.training_spec import TrainingJobSpec
from services.trainer.core import schema
from services.trainer.core.jobs import EpochReport, TrainingSummary
from services.trainer.core.store import TrainerStore, sha256_file
from services.trainer.core.training_data import inspect_training_set, read_training_set
from tests.trainer_datasets import load_table, offline_store, take_up_rows, take_up_spec

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store(database_engine: sa.Engine) -> TrainerStore:
    apply_migrations(database_engine, schema.MIGRATIONS_PACKAGE, version_table=schema.VERSION_TABLE)
    return TrainerStore(database_engine)


@pytest.fixture
def offline(database_url: str, tmp_path: Path) -> sa.Engine:
    """An offline store on the same backend with `take_up` loaded by ingest's loader; read-only."""
    engine = offline_store(database_url)
    load_table(engine, "take_up", take_up_rows(300), tmp_path)
    engine.dispose()
    reader = open_offline_store(database_url)
    yield reader
    reader.dispose()


def test_the_schema_module_matches_the_migrations(store: TrainerStore) -> None:
    with store.engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "version_table": schema.VERSION_TABLE}
        )
        assert compare_metadata(context, schema.metadata) == []


def spec(**overrides: object) -> TrainingJobSpec:
    return take_up_spec(**overrides)


def refusal(offline: sa.Engine, training_spec: TrainingJobSpec) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as raised:
        inspect_training_set(offline, training_spec)
    return raised.value


def test_a_valid_spec_resolves_its_features_and_counts_the_rows(offline: sa.Engine) -> None:
    plan = inspect_training_set(offline, spec())
    assert [(f.name, f.encoding.value, f.dtype) for f in plan.features] == [
        ("age", "standardize", "int64"),
        ("tenure_months", "standardize", "int64"),
        ("region", "one_hot", "string"),
        ("offer_id", "offer", "string"),
    ]
    assert plan.row_count == 300
    assert 0 < plan.positives < 300
    assert plan.in_catalog
    everything = inspect_training_set(offline, spec(features=[], max_categories=1000))
    # Every column but the event time (the catalog names it) and the label; strings become one-hot.
    assert [(f.name, f.encoding.value) for f in everything.features] == [
        ("entity", "one_hot"),
        ("age", "standardize"),
        ("tenure_months", "standardize"),
        ("region", "one_hot"),
        ("offer_id", "one_hot"),
    ]
    error = refusal(offline, spec(features=[]))
    assert error.field == "spec.features"
    assert "'entity' has 150 categories" in error.message


def test_what_the_data_cannot_satisfy_is_refused_naming_the_field(offline: sa.Engine) -> None:
    assert refusal(offline, spec(label="took_it")).field == "spec.label"
    error = refusal(offline, spec(features=["age", "region"]))
    assert (error.field, "one_hot" in error.message) == ("spec.features[1].encoding", True)
    assert refusal(offline, spec(features=["age", "nope"])).field == "spec.features[1].name"
    assert refusal(offline, spec(label="region", features=["age"])).field == "spec.label"  # a string
    error = refusal(offline, spec(training_set="", query="SELECT * FROM take_up WHERE age > 500"))
    assert (error.field, error.message) == ("spec.query", "spec.query: the training set is empty")
    error = refusal(
        offline,
        spec(training_set="", query="SELECT age, label FROM take_up WHERE label = 1", features=["age"]),
    )
    assert error.field == "spec.label"
    assert "one class" in error.message
    error = refusal(offline, spec(features=[{"name": "offer_id", "encoding": "offer"}], max_categories=2))
    assert error.field == "spec.features[0].name"
    assert "3 categories" in error.message
    error = refusal(offline, spec(training_set="", query="SELECT nothing FROM take_up"))
    assert error.field == "spec.query"
    assert "the query fails" in error.message
    error = refusal(offline, spec(split={"time_column": "region"}))
    assert error.field == "spec.split.time_column"
    with pytest.raises(NotFound) as missing:
        inspect_training_set(offline, spec(training_set="nope"))
    assert missing.value.field == "spec.training_set"


def test_a_query_can_split_by_the_time_of_a_timestamp_column(offline: sa.Engine) -> None:
    # Through a query, SQLite returns timestamps as text: the split still reads them as times.
    query = "SELECT t.event_time AS shown_at, t.age, t.region, t.offer_id, t.label FROM take_up AS t"
    by_time = spec(training_set="", query=query, features=["age"], split={"time_column": "shown_at"})
    plan = inspect_training_set(offline, by_time)
    assert plan.split_column == "shown_at"
    data = read_training_set(offline, by_time, plan)
    assert data.split_values is not None
    assert np.isfinite(data.split_values.astype(float)).all()  # every row has a time, as seconds
    assert len(set(data.split_values.tolist())) == data.rows  # one hour apart: all distinct
    # Text that is not a time is still refused.
    error = refusal(
        offline,
        spec(training_set="", query=query, features=["age"], split={"time_column": "region"}),
    )
    assert error.field == "spec.split.time_column"


def test_nan_or_missing_labels_and_empty_tables_are_refused(database_url: str, offline: sa.Engine) -> None:
    writer = sa.create_engine(sa.make_url(database_url).set(drivername=offline.url.drivername))
    try:
        with writer.begin() as connection:
            connection.exec_driver_sql(
                "CREATE TABLE nan_label (age DOUBLE PRECISION, label DOUBLE PRECISION)"
            )
            connection.exec_driver_sql("CREATE TABLE no_rows (age DOUBLE PRECISION, label DOUBLE PRECISION)")
            table = sa.table("nan_label", sa.column("age"), sa.column("label"))
            connection.execute(
                sa.insert(table),
                [{"age": 30.0, "label": 1.0}, {"age": 40.0, "label": 0.0}, {"age": 50.0, "label": math.nan}],
            )
    finally:
        writer.dispose()
    error = refusal(offline, spec(training_set="nan_label", features=["age"]))
    assert error.field == "spec.label"
    assert "NaN or missing in 1 of 3 rows" in error.message
    error = refusal(offline, spec(training_set="no_rows", features=["age"]))
    assert (error.field, error.message) == (
        "spec.training_set",
        "spec.training_set: the training set is empty",
    )


def test_a_query_cannot_write_to_the_offline_store(offline: sa.Engine) -> None:
    with pytest.raises(sa.exc.DBAPIError), offline.connect() as connection:
        connection.exec_driver_sql("DELETE FROM take_up")
    assert inspect_training_set(offline, spec()).row_count == 300


def test_the_same_rows_read_the_same_on_sqlite_and_postgresql(
    tmp_path: Path, postgresql_database_url: str
) -> None:
    fingerprints = set()
    for url in (f"sqlite:///{tmp_path / 'offline.db'}", postgresql_database_url):
        engine = offline_store(url)
        load_table(engine, "take_up", take_up_rows(120), tmp_path)
        engine.dispose()
        reader = open_offline_store(url)
        try:
            training_spec = spec(split={"time_column": "event_time"})
            data = read_training_set(reader, training_spec, inspect_training_set(reader, training_spec))
        finally:
            reader.dispose()
        assert data.rows == 120
        assert data.split_values is not None
        fingerprints.add(data.fingerprint)
    assert len(fingerprints) == 1


def summary(fingerprint: str = "f" * 64) -> TrainingSummary:
    return TrainingSummary(
        test_metrics={
            "auc": 0.7,
            "log_loss": 0.5,
            "calibration_error": 0.05,
            "brier_score": 0.2,
            "rows": 10.0,
        },
        validation_metrics={"auc": 0.69, "log_loss": 0.51, "calibration_error": 0.04, "brier_score": 0.2},
        epochs_trained=3,
        best_epoch=2,
        training_rows=30,
        validation_rows=10,
        test_rows=10,
        data_fingerprint=fingerprint,
        features=[{"name": "age", "dtype": "int64", "encoding": "standardize"}],
        inputs=1,
    )


def staging(tmp_path: Path, job_id: str) -> Path:
    directory = tmp_path / "artifacts" / ".staging" / job_id
    directory.mkdir(parents=True)
    for name in ("model.pt", "preprocessing.json", "reference.json"):
        (directory / name).write_text(f"{job_id}:{name}")
    return directory


def test_a_job_runs_through_its_states_with_one_event_per_change(store: TrainerStore, tmp_path: Path) -> None:
    job = store.create_job(spec(), "alice")
    assert (job.state, job.author, job.max_epochs) == ("queued", "alice", 3)
    assert store.claim_job(job.id) is not None
    assert store.claim_job(job.id) is None  # only once
    store.record_epoch(job.id, EpochReport(1, 3, 0.6, 0.62, {"auc": 0.6, "log_loss": 0.62}, 2.0, 1.0, 100.0))
    version = store.register_version(
        job.id, summary(), staging(tmp_path, job.id), tmp_path / "artifacts", "0.1.0"
    )
    events = store.events_after(job.id, 0)
    assert [(e.sequence, e.state, e.epoch) for e in events] == [
        (1, "queued", 0),
        (2, "running", 0),
        (3, "running", 1),
        (4, "succeeded", 3),
    ]
    assert events[2].metrics == {"auc": 0.6, "log_loss": 0.62}
    assert events[2].eta_seconds == 2.0
    assert (events[3].model_name, events[3].model_version) == ("take-up", 1)
    assert [e.sequence for e in store.events_after(job.id, 2)] == [3, 4]
    finished = store.get_job(job.id)
    assert (finished.state, finished.epochs_done, finished.model_version) == ("succeeded", 1, 1)
    assert finished.finished_at is not None
    assert finished.started_at is not None
    assert store.finish_job(job.id, "cancelled", "too late").state == "succeeded"  # final stays final

    directory = tmp_path / "artifacts" / "take-up" / "1"
    assert version.artifact_uri == directory.resolve().as_uri()
    assert version.checksum == sha256_file(directory / MANIFEST_FILE)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    assert manifest["model"] == "take-up"
    assert manifest["version"] == 1
    assert manifest["files"]["model.pt"] == sha256_file(directory / "model.pt")
    assert version.metrics["validation_auc"] == 0.69
    assert version.metrics["best_epoch"] == 2


def test_versions_are_numbered_per_model_and_listed(store: TrainerStore, tmp_path: Path) -> None:
    for model, fingerprint in (("take-up", "a" * 64), ("take-up", "b" * 64), ("churn", "c" * 64)):
        job = store.create_job(spec(model_name=model), "bob")
        store.claim_job(job.id)
        store.register_version(
            job.id, summary(fingerprint), staging(tmp_path, job.id), tmp_path / "artifacts", "v"
        )
    record, versions = store.get_version("take-up")
    assert (record.version, versions, record.data_fingerprint) == (2, [1, 2], "b" * 64)
    assert store.get_version("take-up", 1)[0].data_fingerprint == "a" * 64
    models, total = store.list_models()
    assert [(m.name, m.latest_version, m.version_count) for m in models] == [
        ("churn", 1, 1),
        ("take-up", 2, 2),
    ]
    assert total == 2
    assert store.list_models(name_prefix="ta")[0][0].name == "take-up"
    with pytest.raises(NotFound) as missing:
        store.get_version("take-up", 7)
    assert missing.value.field == "version"
    assert "has no version 7 (it has 1, 2)" in missing.value.message
    jobs, total = store.list_jobs(model_name="take-up", limit=1)
    assert total == 2
    assert len(jobs) == 1
    assert jobs[0].model_version == 2


def test_a_job_that_is_no_longer_running_registers_nothing(store: TrainerStore, tmp_path: Path) -> None:
    job = store.create_job(spec(), "carol")
    store.claim_job(job.id)
    store.finish_job(job.id, "cancelled", "stop")
    with pytest.raises(FailedPrecondition):
        store.register_version(job.id, summary(), staging(tmp_path, job.id), tmp_path / "artifacts", "v")
    assert not (tmp_path / "artifacts" / "take-up").exists() or not any(
        (tmp_path / "artifacts" / "take-up").iterdir()
    )
    with pytest.raises(NotFound):
        store.get_version("take-up")


def test_jobs_left_running_by_a_dead_trainer_are_failed_with_a_reason(store: TrainerStore) -> None:
    running = store.create_job(spec(), "dave")
    store.claim_job(running.id)
    queued = store.create_job(spec(), "dave")
    assert store.fail_interrupted_jobs("the trainer stopped") == [running.id]
    failed = store.get_job(running.id)
    assert (failed.state, failed.error) == ("failed", "the trainer stopped")
    assert store.events_after(running.id, 0)[-1].message == "the trainer stopped"
    assert store.get_job(queued.id).state == "queued"
    assert store.queued_job_ids() == [queued.id]


def test_a_batch_runs_job_fails_only_when_its_heartbeat_is_stale(store: TrainerStore) -> None:
    batch = store.create_job(spec(), "training-x7k2p")
    assert store.claim_job(batch.id, "batch:training-x7k2p") is not None
    assert store.claim_job(batch.id) is None  # the service cannot take it over
    assert store.fail_interrupted_jobs("the trainer stopped") == []  # not the service's job
    store.beat([batch.id])
    now = datetime.now(UTC)
    assert store.fail_silent_jobs("silent", now - timedelta(seconds=60)) == []
    assert store.fail_silent_jobs("silent", now + timedelta(seconds=1)) == [batch.id]
    assert (store.get_job(batch.id).state, store.get_job(batch.id).error) == ("failed", "silent")
    # The service's own running jobs are never "silent": they fail at its restart instead.
    mine = store.create_job(spec(), "erin")
    store.claim_job(mine.id)
    assert store.fail_silent_jobs("silent", now + timedelta(days=1)) == []
