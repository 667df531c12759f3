"""Compare on an evaluation table, in the trainer's core, on SQLite and PostgreSQL: versions trained
here are registered as a job would register them; the offline store holds the training set, exactly
its test rows, and tables that cannot be scored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from libs.common.database import apply_migrations
from libs.common.errors import InvalidArgument, NotFound
from libs.common.offline_store import open_offline_store
from libs.common.training_spec import Encoding, TrainingJobSpec
from services.trainer.core import schema, training
from services.trainer.core.store import ModelVersionRecord, TrainerStore
from services.trainer.core.trainer_service import COMPARED_METRICS, TrainerService
from services.trainer.core.training_data import (
    ResolvedFeature,
    inspect_evaluation_table,
    inspect_training_set,
    read_training_set,
)
from tests.trainer_datasets import COLUMNS, load_table, offline_store, take_up_rows, take_up_spec

pytestmark = pytest.mark.timeout(90)

TEST_COLUMNS = ("age", "tenure_months", "region", "offer_id", "label")


@dataclass
class Registry:
    service: TrainerService
    offline: sa.Engine
    versions: dict[int, ModelVersionRecord]
    test_rows: int


def register(
    store: TrainerStore, spec: TrainingJobSpec, offline: sa.Engine, scratch: Path
) -> ModelVersionRecord:
    """Train in this process and register the version as a finished job does."""
    plan = inspect_training_set(offline, spec)
    data = read_training_set(offline, spec, plan)
    outcome = training.train_model(spec, plan, data)
    job = store.create_job(spec, "test")
    assert store.claim_job(job.id) is not None
    staging = scratch / f"staging-{job.id}"
    training.write_artifact(outcome, staging)
    return store.register_version(job.id, outcome.summary, staging, scratch / "artifacts", "test")


def held_out_rows(spec: TrainingJobSpec, offline: sa.Engine) -> list[dict[str, object]]:
    """The rows training held out for the test metrics, rebuilt from the data the job read."""
    plan = inspect_training_set(offline, spec)
    data = read_training_set(offline, spec, plan)
    split = training.split_rows(spec.split, data, spec.seed)
    return [
        {
            "age": int(data.columns["age"][row]),
            "tenure_months": int(data.columns["tenure_months"][row]),
            "region": data.columns["region"][row],
            "offer_id": data.columns["offer_id"][row],
            "label": int(data.labels[row]),
        }
        for row in split.test
    ]


@pytest.fixture
async def registry(database_url: str, tmp_path: Path) -> AsyncIterator[Registry]:
    """Version 1 (an MLP) and 2 (a logistic regression) of take-up, trained on the same rows with the
    same seed, so they hold out the same test rows; version 3 predicts another label."""
    engine = offline_store(database_url)
    rows = [{**row, "converted": row["label"]} for row in take_up_rows(300)]
    load_table(engine, "take_up", rows, tmp_path, columns=(*COLUMNS, "converted"))
    apply_migrations(engine, schema.MIGRATIONS_PACKAGE, version_table=schema.VERSION_TABLE)
    reader = open_offline_store(database_url)
    store = TrainerStore(engine)
    one = take_up_spec()
    versions = {
        1: register(store, one, reader, tmp_path),
        2: register(store, take_up_spec(model_type="logistic_regression"), reader, tmp_path),
        3: register(store, take_up_spec(label="converted", hyperparameters={"epochs": 1}), reader, tmp_path),
    }
    held_out = held_out_rows(one, reader)
    load_table(engine, "take_up_test", held_out, tmp_path, columns=TEST_COLUMNS)
    load_table(engine, "no_region", held_out, tmp_path, columns=("age", "tenure_months", "offer_id", "label"))
    load_table(engine, "bad_label", [{**r, "label": 2} for r in held_out[:5]], tmp_path, columns=TEST_COLUMNS)
    with engine.begin() as connection:  # not through ingest: a plain table, empty, no catalog entry
        connection.execute(
            sa.text(
                "CREATE TABLE empty_rows (age BIGINT, tenure_months BIGINT, region TEXT, offer_id TEXT, label BIGINT)"
            )
        )
    service = TrainerService(
        store,
        reader,
        offline_store_url=database_url,
        artifact_dir=tmp_path / "artifacts",
        max_concurrent_jobs=1,
        config=None,
    )
    try:
        yield Registry(service, reader, versions, len(held_out))
    finally:
        await service.stop()
        reader.dispose()
        engine.dispose()


async def test_scored_on_exactly_its_test_rows_a_version_reproduces_its_stored_test_metrics(
    registry: Registry,
) -> None:
    compared = await registry.service.compare("take-up", 1, 2, "take_up_test")
    assert compared.evaluated_rows == registry.test_rows == 60
    assert [metric for metric, *_ in compared.deltas] == list(COMPARED_METRICS)
    one, two = registry.versions[1], registry.versions[2]
    for metric, a, b, delta, b_better in compared.deltas:
        assert a == pytest.approx(one.metrics[metric], rel=1e-6, abs=1e-9), metric
        assert b == pytest.approx(two.metrics[metric], rel=1e-6, abs=1e-9), metric
        assert delta == pytest.approx(b - a)
        assert b_better == (b > a if COMPARED_METRICS[metric] else b < a)
    # The stored comparison of the same pair says the same, without scoring.
    stored = await registry.service.compare("take-up", 1, 2, "")
    assert stored.evaluated_rows == 0
    assert [d[0] for d in stored.deltas] == [d[0] for d in compared.deltas]
    for (_, a, b, *_), (_, scored_a, scored_b, *_) in zip(stored.deltas, compared.deltas, strict=True):
        assert (a, b) == pytest.approx((scored_a, scored_b), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize(
    ("table", "error", "words"),
    [
        ("no_such_table", NotFound, "no table 'no_such_table' in the offline store"),
        ("no_region", InvalidArgument, "no column 'region' in table 'no_region'; version 1 reads it"),
        ("empty_rows", InvalidArgument, "table 'empty_rows' is empty"),
        ("bad_label", InvalidArgument, "the label 'label' must be 0 or 1"),
        ("take_up; DROP TABLE take_up", InvalidArgument, "is not a table name"),
    ],
)
async def test_a_table_that_cannot_be_scored_is_refused_naming_evaluation_table(
    registry: Registry, table: str, error: type[Exception], words: str
) -> None:
    with pytest.raises(error) as raised:
        await registry.service.compare("take-up", 1, 2, table)
    assert str(raised.value).startswith("evaluation_table: "), raised.value
    assert words in str(raised.value)


async def test_versions_that_predict_different_labels_cannot_share_a_table(registry: Registry) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await registry.service.compare("take-up", 1, 3, "take_up_test")
    assert str(raised.value).startswith("evaluation_table: version 1 predicts 'label' and version 3 predicts")


async def test_the_table_is_checked_for_types_and_size_before_it_is_read(registry: Registry) -> None:
    age = ResolvedFeature("age", Encoding.STANDARDIZE, "int64")
    region_as_number = ResolvedFeature("region", Encoding.STANDARDIZE, "int64")
    with pytest.raises(InvalidArgument) as raised:
        inspect_evaluation_table(
            registry.offline, "take_up_test", "label", {"version 9": [age, region_as_number]}, max_rows=100
        )
    assert str(raised.value).startswith("evaluation_table: column 'region' of table 'take_up_test' is string")
    with pytest.raises(InvalidArgument) as raised:
        inspect_evaluation_table(registry.offline, "take_up_test", "label", {"version 9": [age]}, max_rows=59)
    assert "has 60 rows, more than the 59 an evaluation reads" in str(raised.value)
    plan = inspect_evaluation_table(
        registry.offline, "take_up_test", "label", {"version 9": [age]}, max_rows=60
    )
    assert (plan.row_count, plan.numeric, plan.categorical, plan.in_catalog) == (60, ("age",), (), True)
