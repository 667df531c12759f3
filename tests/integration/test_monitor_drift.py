"""GetDrift's logic over the real archive: contacts logged with feature snapshots go through the
real consumer into the Parquet archive; the drift of each model input and of the score is computed
against a training reference built like the trainer's. One input is shifted: it, and only it, is
flagged. Bad requests are refused with the field named."""

from __future__ import annotations

import json
import time
import uuid as uuid_module
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from redis.asyncio import Redis

from libs.common.database import apply_migrations, create_database_engine
from libs.common.decision_log import Contact
from libs.common.distribution_drift import TrainingReference, build_reference
from libs.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.monitor.core.decision_archive import DecisionArchive
from services.monitor.core.decision_consumer import ConsumerOptions, DecisionLogConsumer
from services.monitor.core.monitor_service import MonitorService
from services.monitor.core.rollup_store import RollupStore
from services.monitor.core.schema import MIGRATIONS_PACKAGE, VERSION_TABLE
from tests.decision_records import OFFERS, contact
from tests.integration.test_predictor_decision import spec_document

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TRAINING_ROWS = 5000
SERVED = 2000


@dataclass
class FakeTrainer:
    reference: TrainingReference

    async def training_reference(self, name: str, version: int) -> TrainingReference | None:
        known = (self.reference.model_name, self.reference.model_version)
        return self.reference if (name, version) in (known, (name, 0)) and name == known[0] else None


@dataclass
class FakeConfig:
    spec_json: str

    async def head_revision(self, deployment: str) -> int | None:
        return 1

    async def spec(self, deployment: str, revision: int) -> tuple[str, int] | None:
        return self.spec_json, 1

    async def replica_states(self) -> list[Any]:
        return []


def training_reference() -> TrainingReference:
    rng = np.random.default_rng(1)
    return build_reference(
        {
            "age": rng.normal(40, 10, TRAINING_ROWS),
            "tenure": rng.exponential(24, TRAINING_ROWS),
            "plan": rng.choice(["prepaid", "contract"], TRAINING_ROWS, p=[0.7, 0.3]),
            "offer": rng.choice(list(OFFERS), TRAINING_ROWS),
        },
        rng.beta(2, 5, TRAINING_ROWS),
        categorical=["plan", "offer"],
        offer_input="offer",
        model_name="take-up",
        model_version=3,
    )


def served_contacts(deployment: str, now: float, age_shift: float) -> list[Contact]:
    rng = np.random.default_rng(2)
    records = []
    for i in range(SERVED):
        features = {
            "age": f"{rng.normal(40 + age_shift, 10):.2f}",
            "tenure": f"{rng.exponential(24):.2f}",
            "plan": str(rng.choice(["prepaid", "contract"], p=[0.7, 0.3])),
        }
        base = contact(deployment, time=now - SERVED + i, features=features, shown=(OFFERS[i % len(OFFERS)],))
        records.append(
            replace(base, shown=[replace(row, model_score=float(rng.beta(2, 5))) for row in base.shown])
        )
    return records


@pytest.fixture
async def service_with_log(
    database_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[tuple[MonitorService, str]]:
    engine = create_database_engine(database_url)
    apply_migrations(engine, MIGRATIONS_PACKAGE, version_table=VERSION_TABLE)
    redis = Redis.from_url(redis_url)
    suffix = uuid_module.uuid4().hex[:8]
    deployment = f"drift-{suffix}"
    store, archive = RollupStore(engine), DecisionArchive(tmp_path / "decisions", retention_hours=48)
    consumer = DecisionLogConsumer(
        redis, store, archive, ConsumerOptions(stream=f"test-drift-{suffix}", consumer="m", block_ms=20)
    )
    now = time.time()
    for record in served_contacts(deployment, now, age_shift=15.0):
        entry: Any = record.encode()
        await redis.xadd(consumer.options.stream, entry)
    while await consumer.step():
        pass
    spec = json.dumps(spec_document(deployment, model={"name": "take-up", "version": 3}))
    service = MonitorService(store, archive, consumer, FakeConfig(spec), FakeTrainer(training_reference()))
    try:
        yield service, deployment
    finally:
        await redis.aclose()
        engine.dispose()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_shifted_input_and_only_it_is_flagged(service_with_log: tuple[MonitorService, str]) -> None:
    service, deployment = service_with_log
    window, report = await service.drift(deployment)
    assert report.contacts == SERVED
    by_name = {row.name: row for row in report.features}
    assert set(by_name) == {"age", "tenure", "plan", "offer"}
    assert report.features[0].name == "age"  # most drifted first
    assert by_name["age"].severity == "critical"
    assert by_name["age"].psi is not None
    assert by_name["age"].psi > 0.25
    assert by_name["age"].current_mean == pytest.approx(55, abs=1)
    assert by_name["tenure"].severity == "ok"
    assert by_name["plan"].severity == "ok"
    # The model's offer input is compared with the offers shown (in no feature snapshot).
    assert by_name["offer"].severity == "ok"
    assert by_name["offer"].current_count == SERVED
    assert by_name["offer"].current_missing_rate == 0
    assert report.score.severity == "ok"
    assert report.score.current_count == SERVED
    assert window.end - window.start == pytest.approx(86400)
    _, only_plan = await service.drift(deployment, features=["plan"], model=("take-up", 3))
    assert [row.name for row in only_plan.features] == ["plan"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_bad_drift_requests_name_the_field(service_with_log: tuple[MonitorService, str]) -> None:
    service, deployment = service_with_log
    with pytest.raises(InvalidArgument, match="features"):
        await service.drift(deployment, features=["no_such_input"])
    with pytest.raises(NotFound, match="reference_model"):
        await service.drift(deployment, model=("take-up", 99))
    with pytest.raises(InvalidArgument, match="window"):
        await service.drift(deployment, window_seconds=10 * 365 * 86400)
    service.config = FakeConfig(json.dumps(spec_document(deployment)))
    with pytest.raises(FailedPrecondition, match="binds no model"):
        await service.drift(deployment)
