"""GetTrainingReference over gRPC: a version trained in a real worker (and one under torchrun) records
what its inputs and predicted score looked like in training; versions without one are NOT_FOUND.

The trainer is built as `python -m services.trainer` builds it (auth on, interceptors, SQLite files).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import sqlalchemy as sa
from google.protobuf import json_format, struct_pb2
from grpc import aio

from libs.common.client import open_channel
from libs.common.distribution_drift import SCORE, TrainingReference, compare
from libs.protos.liveloop.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.server import build_server as build_trainer
from tests.conftest import ApiKeys
from tests.grpc.conftest import SERVICES_UNDER_TEST, target
from tests.trainer_datasets import OFFERS, REGIONS, load_table, offline_store, take_up_rows

pytestmark = pytest.mark.timeout(120)

ROWS = 600
INPUTS = ["age", "tenure_months", "region", "offer_id"]


def training_spec(**overrides: Any) -> trainer_pb2.TrainingSpec:
    spec = trainer_pb2.TrainingSpec(
        model_name="take-up",
        training_set="take_up",
        label="label",
        features=["age", "tenure_months", "region:one_hot", "offer_id:offer"],
        model_type=trainer_pb2.MODEL_TYPE_MLP,
        max_epochs=2,
        seed=11,
        **overrides,
    )
    for key, value in {"learning_rate": 0.05, "batch_size": 128, "hidden_sizes": [8]}.items():
        spec.hyperparameters[key].CopyFrom(json_format.ParseDict(value, struct_pb2.Value()))
    return spec


@dataclass
class Trainer:
    stub: trainer_pb2_grpc.TrainerServiceStub
    invoke_stub: trainer_pb2_grpc.TrainerServiceStub
    database_url: str


@pytest.fixture
async def trainer(tmp_path: Path, api_keys: ApiKeys) -> AsyncIterator[Trainer]:
    offline_url = f"sqlite:///{tmp_path / 'ingest.db'}"
    engine = offline_store(offline_url)
    load_table(engine, "take_up", take_up_rows(ROWS), tmp_path)
    engine.dispose()
    settings = SERVICES_UNDER_TEST["trainer"].settings(
        tmp_path, api_keys, None, offline_store_url=offline_url, max_concurrent_jobs=2
    )
    running = await build_trainer(settings)
    channels: list[aio.Channel] = []
    try:
        admin = open_channel(target(running), api_key=api_keys.admin, deadline_seconds=30)
        invoke = open_channel(target(running), api_key=api_keys.invoke, deadline_seconds=30)
        channels += [admin, invoke]
        yield Trainer(
            trainer_pb2_grpc.TrainerServiceStub(admin),
            trainer_pb2_grpc.TrainerServiceStub(invoke),
            settings.database_url,
        )
    finally:
        for channel in channels:
            await channel.close()
        await running.stop()


async def train(trainer: Trainer, spec: trainer_pb2.TrainingSpec) -> int:
    started = await trainer.stub.StartTraining(trainer_pb2.StartTrainingRequest(spec=spec))
    last = None
    async for event in trainer.stub.WatchJob(
        trainer_pb2.WatchJobRequest(job_id=started.job_id, from_start=True)
    ):
        last = event
    assert last is not None
    assert last.state == trainer_pb2.JOB_STATE_SUCCEEDED, last.message
    return int(last.model.version)


async def reference_of(
    trainer: Trainer, version: int
) -> tuple[trainer_pb2.GetTrainingReferenceResponse, TrainingReference]:
    response = await trainer.stub.GetTrainingReference(
        trainer_pb2.GetTrainingReferenceRequest(name="take-up", version=version)
    )
    return response, TrainingReference.from_json(json.loads(response.reference_json))


async def test_a_trained_version_reads_back_the_reference_of_every_input_and_its_score(
    trainer: Trainer,
) -> None:
    one = await train(trainer, training_spec())
    torchrun = await train(trainer, training_spec(workers=2))  # rank 0 writes it, as one process does
    rows = take_up_rows(ROWS)

    response, reference = await reference_of(trainer, one)
    assert (response.model.name, response.model.version) == ("take-up", one)
    assert (reference.model_name, reference.model_version) == ("take-up", one)
    assert list(response.inputs) == INPUTS == list(reference.inputs)
    assert response.rows == reference.rows == ROWS
    assert response.created_at.ToDatetime().replace(microsecond=0) == reference.created_at.replace(
        microsecond=0, tzinfo=None
    )
    assert reference.offer_input == "offer_id"
    for name in ("age", "tenure_months"):
        numeric = reference.inputs[name]
        assert numeric.kind == "numeric"
        assert numeric.mean == pytest.approx(float(np.mean([row[name] for row in rows])), abs=1e-9)
        assert math.isclose(sum(numeric.bin_shares), 1.0)
        assert all(share > 0 for share in numeric.bin_shares)
        assert (numeric.count, numeric.missing_rate) == (ROWS, 0.0)
        # The served feature snapshot holds text: the training values, as text, have not drifted.
        assert compare(numeric, [str(row[name]) for row in rows]).severity == "ok"
    for name, categories in (("region", REGIONS), ("offer_id", OFFERS)):
        categorical = reference.inputs[name]
        counts = Counter(row[name] for row in rows)
        assert dict(zip(categorical.categories, categorical.bin_shares, strict=False)) == {
            category: counts[category] / ROWS for category in categories
        }
        assert math.isclose(sum(categorical.bin_shares), 1.0)
    score = reference.score
    assert (score.name, score.count, score.missing_rate) == (SCORE, ROWS, 0.0)
    assert score.mean is not None
    assert 0.2 < score.mean < 0.8  # predicted take-up near the data's
    assert math.isclose(sum(score.bin_shares), 1.0)
    assert 0 < score.quantiles[0] <= score.quantiles[-1] < 1

    newest_response, newest = await reference_of(trainer, 0)
    assert newest_response.model.version == torchrun
    assert newest.inputs == reference.inputs  # the same rows, read the same way
    assert newest.score.mean == pytest.approx(score.mean, abs=0.05)


async def test_versions_without_a_reference_and_unknown_ones_are_not_found(trainer: Trainer) -> None:
    version = await train(trainer, training_spec())
    engine = sa.create_engine(trainer.database_url)
    try:
        with engine.begin() as connection:  # as a version registered before the trainer recorded one
            connection.execute(sa.text("UPDATE model_versions SET training_reference = NULL"))
    finally:
        engine.dispose()
    cases = [
        (trainer_pb2.GetTrainingReferenceRequest(name="take-up", version=version), grpc.StatusCode.NOT_FOUND),
        (trainer_pb2.GetTrainingReferenceRequest(name="take-up", version=7), grpc.StatusCode.NOT_FOUND),
        (trainer_pb2.GetTrainingReferenceRequest(name="nope"), grpc.StatusCode.NOT_FOUND),
        (trainer_pb2.GetTrainingReferenceRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (
            trainer_pb2.GetTrainingReferenceRequest(name="take-up", version=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]
    details = []
    for request, code in cases:
        with pytest.raises(aio.AioRpcError) as refused:
            await trainer.stub.GetTrainingReference(request)
        assert refused.value.code() == code, refused.value.details()
        details.append(refused.value.details())
    assert "has no training reference" in details[0]
    assert "registered before the trainer recorded one" in details[0]
    assert details[0].startswith("version: ")
    assert details[2].startswith("name: ")
    # Like every trainer RPC, it needs the admin role.
    with pytest.raises(aio.AioRpcError) as denied:
        await trainer.invoke_stub.GetTrainingReference(
            trainer_pb2.GetTrainingReferenceRequest(name="take-up")
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
