"""The registry stores a version's training reference (SQLite and PostgreSQL): numbered with the
version, read back whole, absent (NotFound) for versions registered before migration 0003."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from alembic import command

from libs.common.database import alembic_config, apply_migrations, write_transaction
from libs.common.distribution_drift import TrainingReference, build_reference
from libs.common.errors import NotFound
from services.trainer.core import schema
from services.trainer.core.jobs import TRAINING_REFERENCE_FILE, TrainingSummary
from services.trainer.core.store import TrainerStore
from tests.trainer_datasets import take_up_spec

pytestmark = pytest.mark.timeout(60)


def summary() -> TrainingSummary:
    metrics = {"auc": 0.7, "log_loss": 0.5, "calibration_error": 0.05, "brier_score": 0.2, "rows": 10.0}
    return TrainingSummary(
        test_metrics=metrics,
        validation_metrics=metrics,
        epochs_trained=3,
        best_epoch=2,
        training_rows=30,
        validation_rows=10,
        test_rows=10,
        data_fingerprint="f" * 64,
        features=[
            {"name": "age", "dtype": "int64", "encoding": "standardize"},
            {"name": "region", "dtype": "string", "encoding": "one_hot"},
        ],
        inputs=4,
    )


def reference() -> TrainingReference:
    rng = np.random.default_rng(3)
    return build_reference(
        {"age": rng.integers(18, 76, 50), "region": rng.choice(["north", "south", "east"], 50)},
        rng.random(50),
        categorical={"region"},
        model_name="take-up",
        created_at=datetime(2026, 12, 7, tzinfo=UTC),
    )


def staging(tmp_path: Path, job_id: str, with_reference: bool) -> Path:
    directory = tmp_path / "artifacts" / ".staging" / job_id
    directory.mkdir(parents=True)
    for name in ("model.pt", "preprocessing.json", "reference.json"):
        (directory / name).write_text(f"{job_id}:{name}")
    if with_reference:
        (directory / TRAINING_REFERENCE_FILE).write_text(json.dumps(reference().to_json()))
    return directory


def register(store: TrainerStore, tmp_path: Path, *, with_reference: bool) -> int:
    job = store.create_job(take_up_spec(), "alice")
    store.claim_job(job.id)
    record = store.register_version(
        job.id, summary(), staging(tmp_path, job.id, with_reference), tmp_path / "artifacts", "0.1.0"
    )
    return record.version


def test_a_version_keeps_its_training_reference_and_an_older_one_has_none(
    database_engine: sa.Engine, tmp_path: Path
) -> None:
    apply_migrations(database_engine, schema.MIGRATIONS_PACKAGE, version_table=schema.VERSION_TABLE)
    store = TrainerStore(database_engine)
    without = register(store, tmp_path, with_reference=False)  # a worker of an older trainer
    with_one = register(store, tmp_path, with_reference=True)

    stored = store.get_training_reference("take-up", with_one)
    assert stored == reference().for_version("take-up", with_one)
    assert store.get_training_reference("take-up") == stored  # 0: the newest version
    artifact = tmp_path / "artifacts" / "take-up" / str(with_one)
    assert not (artifact / TRAINING_REFERENCE_FILE).exists()  # no part of the artifact
    # The registry's other reads do not carry it, and are unchanged.
    record, versions = store.get_version("take-up", with_one)
    assert (record.version, versions) == (with_one, [without, with_one])
    assert store.list_models()[0][0].latest_version == with_one

    with pytest.raises(NotFound) as missing:
        store.get_training_reference("take-up", without)
    assert missing.value.field == "version"
    assert f"version {without} has no training reference" in missing.value.message
    with pytest.raises(NotFound) as unknown:
        store.get_training_reference("nope")
    assert unknown.value.field == "name"
    with pytest.raises(NotFound) as no_version:
        store.get_training_reference("take-up", 9)
    assert no_version.value.field == "version"


def test_migration_0003_leaves_versions_registered_before_it_without_a_reference(
    database_engine: sa.Engine, tmp_path: Path
) -> None:
    with write_transaction(database_engine) as connection:
        config = alembic_config(
            schema.MIGRATIONS_PACKAGE, version_table=schema.VERSION_TABLE, connection=connection
        )
        command.upgrade(config, "0002")
        columns = {column["name"] for column in sa.inspect(connection).get_columns("model_versions")}
    assert "training_reference" not in columns
    old_columns = [column for column in schema.model_versions.c if column.name != "training_reference"]
    old_versions = sa.Table(
        "model_versions", sa.MetaData(), *(sa.Column(c.name, c.type) for c in old_columns)
    )
    now = datetime(2026, 11, 30, tzinfo=UTC)
    with write_transaction(database_engine) as connection:
        connection.execute(
            sa.insert(schema.training_jobs).values(
                id="job-old", model_name="take-up", spec="{}", state="succeeded", max_epochs=1, created_at=now
            )
        )
        connection.execute(
            sa.insert(schema.models).values(name="take-up", latest_version=1, created_at=now, updated_at=now)
        )
        connection.execute(
            sa.insert(old_versions).values(
                name="take-up",
                version=1,
                model_type="mlp",
                log_loss=0.5,
                calibration_error=0.1,
                brier_score=0.2,
                test_rows=10,
                metrics="{}",
                features="[]",
                label="label",
                training_set="take_up",
                data_fingerprint="f" * 64,
                code_version="old",
                artifact_uri="file:///nowhere",
                checksum="0" * 64,
                hyperparameters="{}",
                seed=1,
                training_rows=30,
                description="",
                job_id="job-old",
                created_at=now,
            )
        )
    assert (
        apply_migrations(database_engine, schema.MIGRATIONS_PACKAGE, version_table=schema.VERSION_TABLE)
        == "0003"
    )
    store = TrainerStore(database_engine)
    assert store.get_version("take-up", 1)[0].code_version == "old"
    with pytest.raises(NotFound, match="registered before the trainer recorded one"):
        store.get_training_reference("take-up", 1)
    with write_transaction(database_engine) as connection:
        config = alembic_config(
            schema.MIGRATIONS_PACKAGE, version_table=schema.VERSION_TABLE, connection=connection
        )
        command.downgrade(config, "0002")
        columns = {column["name"] for column in sa.inspect(connection).get_columns("model_versions")}
    assert "training_reference" not in columns
