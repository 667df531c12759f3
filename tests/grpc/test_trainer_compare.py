"""TrainerService.Compare with an evaluation table, over gRPC and through `liveloop compare`.

Versions are trained once for the module in this process and registered as a finished job
registers them; each test starts a trainer (auth on, interceptors, port 0) over that registry and
an offline store loaded by ingest's loader. Expected metrics are computed here independently: the
predictor's loader scores the table's rows one by one, scikit-learn measures.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import sqlalchemy as sa
from grpc import aio
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score
from typer.testing import CliRunner

from libs.common.client import open_channel
from libs.common.database import apply_migrations, create_database_engine
from libs.common.model_artifacts import MODEL_FILE
from libs.common.offline_store import open_offline_store
from libs.common.server import RunningServer
from libs.common.training_spec import TrainingJobSpec
from libs.policy.models import load_model
from libs.protos.liveloop.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.core import schema, training
from services.trainer.core.store import TrainerStore
from services.trainer.core.training_data import inspect_training_set, read_training_set
from services.trainer.server import build_server as build_trainer
from tests.conftest import ApiKeys
from tests.grpc.conftest import SERVICES_UNDER_TEST, health_status, target
from tests.trainer_datasets import COLUMNS, load_table, offline_store, take_up_rows, take_up_spec

pytestmark = pytest.mark.timeout(90)

EVALUATION_ROWS = 250
METRICS = ("auc", "log_loss", "calibration_error", "brier_score")


@dataclass(frozen=True)
class Registry:
    registry_url: str
    offline_url: str
    artifacts: Path


def _register(store: TrainerStore, spec: TrainingJobSpec, outcome: Any, scratch: Path) -> int:
    job = store.create_job(spec, "test")
    assert store.claim_job(job.id) is not None
    staging = scratch / f"staging-{job.id}"
    training.write_artifact(outcome, staging)
    return store.register_version(job.id, outcome.summary, staging, scratch / "artifacts", "test").version


def _train(spec: TrainingJobSpec, offline: sa.Engine) -> Any:
    plan = inspect_training_set(offline, spec)
    return training.train_model(spec, plan, read_training_set(offline, spec, plan))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """take-up versions 1 (MLP with the offer), 2 (logistic regression without it), 3 (version 2's
    model, registered again, then its model.pt changed) and 4 (predicts `converted`, not `label`)."""
    scratch = tmp_path_factory.mktemp("compare")
    offline_url = f"sqlite:///{scratch / 'ingest.db'}"
    writer = offline_store(offline_url)
    load_table(
        writer,
        "take_up",
        [{**row, "converted": row["label"]} for row in take_up_rows(400)],
        scratch,
        columns=(*COLUMNS, "converted"),
    )
    fresh = take_up_rows(EVALUATION_ROWS, seed=99)
    load_table(writer, "take_up_eval", fresh, scratch)
    load_table(writer, "no_region", fresh, scratch, columns=[c for c in COLUMNS if c != "region"])
    load_table(writer, "no_label", fresh, scratch, columns=[c for c in COLUMNS if c != "label"])
    load_table(writer, "one_class", [{**row, "label": 0} for row in fresh], scratch)
    with writer.begin() as connection:  # a plain table with no rows (ingest loads none)
        connection.execute(
            sa.text(
                "CREATE TABLE empty_rows (age BIGINT, tenure_months BIGINT, region TEXT, offer_id TEXT, label BIGINT)"
            )
        )
    writer.dispose()

    registry_url = f"sqlite:///{scratch / 'trainer.db'}"
    engine = create_database_engine(registry_url)
    apply_migrations(engine, schema.MIGRATIONS_PACKAGE, version_table=schema.VERSION_TABLE)
    store = TrainerStore(engine)
    reader = open_offline_store(offline_url)
    try:
        mlp = take_up_spec()
        logistic = take_up_spec(
            model_type="logistic_regression",
            features=["age", "tenure_months", {"name": "region", "encoding": "one_hot"}],
        )
        other_label = take_up_spec(label="converted", hyperparameters={"epochs": 1})
        logistic_outcome = _train(logistic, reader)
        assert _register(store, mlp, _train(mlp, reader), scratch) == 1
        assert _register(store, logistic, logistic_outcome, scratch) == 2
        assert _register(store, logistic, logistic_outcome, scratch) == 3
        assert _register(store, other_label, _train(other_label, reader), scratch) == 4
    finally:
        reader.dispose()
        engine.dispose()
    with (scratch / "artifacts" / "take-up" / "3" / MODEL_FILE).open("ab") as model:
        model.write(b"\0")
    return Registry(registry_url, offline_url, scratch / "artifacts")


@dataclass
class Trainer:
    stub: trainer_pb2_grpc.TrainerServiceStub
    running: RunningServer


@pytest.fixture
async def trainer(registry: Registry, tmp_path: Path, api_keys: ApiKeys) -> AsyncIterator[Trainer]:
    settings = SERVICES_UNDER_TEST["trainer"].settings(
        tmp_path,
        api_keys,
        None,
        database_url=registry.registry_url,
        offline_store_url=registry.offline_url,
        artifact_dir=registry.artifacts,
    )
    running = await build_trainer(settings)
    try:
        async with open_channel(target(running), api_key=api_keys.admin, deadline_seconds=60) as channel:
            yield Trainer(trainer_pb2_grpc.TrainerServiceStub(channel), running)
    finally:
        await running.stop()


def expected_metrics(registry: Registry, version: int, rows: list[dict[str, Any]]) -> dict[str, float]:
    """What a version scores on `rows`, computed without the trainer: the predictor's loader encodes
    and predicts row by row, scikit-learn (and a ten-bin calibration error written out) measures."""
    model = load_model(registry.artifacts / "take-up" / str(version), "take-up", version)
    scores = np.array([float(model.predict(model.encoder.encode(row)[None, :])[0]) for row in rows])
    labels = np.array([row["label"] for row in rows], dtype=np.float64)
    bins = np.minimum((scores * 10).astype(int), 9)
    calibration = sum(
        (bins == b).sum() * abs(scores[bins == b].mean() - labels[bins == b].mean())
        for b in range(10)
        if (bins == b).any()
    ) / len(rows)
    return {
        "auc": float(roc_auc_score(labels, scores)),
        "log_loss": float(log_loss(labels, scores, labels=[0, 1])),
        "calibration_error": float(calibration),
        "brier_score": float(brier_score_loss(labels, scores)),
    }


def table_rows(registry: Registry, table: str) -> list[dict[str, Any]]:
    engine = create_database_engine(registry.offline_url)
    try:
        with engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(sa.text(f"SELECT * FROM {table}"))]
    finally:
        engine.dispose()


async def test_each_version_scores_the_table_as_its_own_artifact_does(
    trainer: Trainer, registry: Registry
) -> None:
    compared = await trainer.stub.Compare(
        trainer_pb2.CompareRequest(name="take-up", version_a=1, version_b=2, evaluation_table="take_up_eval")
    )
    assert compared.evaluated_rows == EVALUATION_ROWS
    assert (compared.a.version, compared.b.version) == (1, 2)
    assert list(compared.features_removed) == ["offer_id"]
    assert compared.same_data is False
    rows = table_rows(registry, "take_up_eval")
    assert len(rows) == EVALUATION_ROWS
    one, two = expected_metrics(registry, 1, rows), expected_metrics(registry, 2, rows)
    assert [delta.metric for delta in compared.deltas] == list(METRICS)
    for delta in compared.deltas:
        assert delta.a == pytest.approx(one[delta.metric], rel=1e-6, abs=1e-9), delta.metric
        assert delta.b == pytest.approx(two[delta.metric], rel=1e-6, abs=1e-9), delta.metric
        assert delta.delta == pytest.approx(delta.b - delta.a)
        assert delta.b_better == (delta.b > delta.a if delta.metric == "auc" else delta.b < delta.a)
    # Scored on other rows than their test split: not the stored test metrics.
    assert compared.deltas[0].a != pytest.approx(compared.a.metrics.auc, rel=1e-6)

    stored = await trainer.stub.Compare(trainer_pb2.CompareRequest(name="take-up", version_a=1, version_b=2))
    assert stored.evaluated_rows == 0
    assert stored.deltas[0].a == compared.a.metrics.auc


async def test_scoring_runs_off_the_event_loop_and_a_one_class_table_has_no_auc(trainer: Trainer) -> None:
    scoring = asyncio.ensure_future(
        trainer.stub.Compare(
            trainer_pb2.CompareRequest(name="take-up", version_a=1, version_b=2, evaluation_table="one_class")
        )
    )
    # While the worker starts and scores, the trainer answers other calls.
    listed = await trainer.stub.ListModels(trainer_pb2.ListModelsRequest())
    assert not scoring.done()
    assert [model.name for model in listed.models] == ["take-up"]
    compared = await scoring
    assert compared.evaluated_rows == EVALUATION_ROWS
    # AUC is undefined with one class; the other metrics are compared.
    assert [delta.metric for delta in compared.deltas] == ["log_loss", "calibration_error", "brier_score"]


@pytest.mark.parametrize(
    ("versions", "table", "code", "prefix"),
    [
        (
            (1, 2),
            "no_such_table",
            "NOT_FOUND",
            "evaluation_table: no table 'no_such_table' in the offline store",
        ),
        (
            (1, 2),
            "no_region",
            "INVALID_ARGUMENT",
            "evaluation_table: no column 'region' in table 'no_region'",
        ),
        (
            (1, 2),
            "no_label",
            "INVALID_ARGUMENT",
            "evaluation_table: no label column 'label' in table 'no_label'",
        ),
        ((1, 2), "empty_rows", "INVALID_ARGUMENT", "evaluation_table: table 'empty_rows' is empty"),
        (
            (1, 4),
            "take_up_eval",
            "INVALID_ARGUMENT",
            "evaluation_table: version 1 predicts 'label' and version 4",
        ),
        (
            (1, 3),
            "take_up_eval",
            "FAILED_PRECONDITION",
            "version_b: model 'take-up' version 3: checksum mismatch",
        ),
        ((1, 9), "take_up_eval", "NOT_FOUND", "version_b: model 'take-up' has no version 9"),
    ],
)
async def test_a_comparison_that_cannot_be_scored_names_why_and_the_trainer_keeps_serving(
    trainer: Trainer, versions: tuple[int, int], table: str, code: str, prefix: str
) -> None:
    request = trainer_pb2.CompareRequest(
        name="take-up", version_a=versions[0], version_b=versions[1], evaluation_table=table
    )
    with pytest.raises(aio.AioRpcError) as raised:
        await trainer.stub.Compare(request)
    assert raised.value.code() == getattr(grpc.StatusCode, code)
    assert (raised.value.details() or "").startswith(prefix), raised.value.details()
    # The trainer still answers, Compare included.
    assert await health_status(trainer.running) == "SERVING"
    stored = await trainer.stub.Compare(trainer_pb2.CompareRequest(name="take-up", version_a=1, version_b=2))
    assert len(stored.deltas) == len(METRICS)


def _cli(*arguments: str, api_key: str, state_dir: Path) -> Any:
    from libs.cli.main import app

    return CliRunner().invoke(
        app, [*arguments, "--state-dir", str(state_dir)], env={"LIVELOOP_API_KEY": api_key, "COLUMNS": "200"}
    )


async def test_liveloop_compare_on_a_table_prints_the_scored_metrics(
    trainer: Trainer, api_keys: ApiKeys, tmp_path: Path
) -> None:
    where = target(trainer.running)
    result = await asyncio.to_thread(
        _cli,
        "compare", "take-up", "1", "2", "--on", "take_up_eval", "--json", "--target", where,
        api_key=api_keys.admin,
        state_dir=tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert int(document["evaluated_rows"]) == EVALUATION_ROWS
    assert [delta["metric"] for delta in document["deltas"]] == list(METRICS)
    assert all(math.isfinite(delta["a"]) and math.isfinite(delta["b"]) for delta in document["deltas"])

    table = await asyncio.to_thread(
        _cli, "compare", "take-up", "1", "2", "--target", where, api_key=api_keys.admin, state_dir=tmp_path
    )
    assert table.exit_code == 0, table.output
    assert "version 1 vs version 2, stored test metrics" in table.stdout
    assert "log loss (lower is better)" in table.stdout
    assert "features removed in v2: offer_id" in table.stdout

    refused = await asyncio.to_thread(
        _cli,
        "compare", "take-up", "1", "2", "--on", "nope", "--target", where,
        api_key=api_keys.admin,
        state_dir=tmp_path,
    )  # fmt: skip
    assert refused.exit_code == 1
    assert "NOT_FOUND: evaluation_table: no table 'nope'" in refused.stderr
