"""Training jobs in real `spawn`ed worker processes, with job state in SQLite and PostgreSQL: a trainer
restart fails the job it left running (with the reason) and runs the ones still queued; a worker
trains exactly the model this process trains from the same spec and data; stopping the trainer
ends the job it was running."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from libs.common.database import apply_migrations
from libs.common.offline_store import open_offline_store
from libs.policy.models import load_model
from services.trainer.core import schema, training
from services.trainer.core.job_runner import (
    BATCH_STAGING_DIR,
    INTERRUPTED_REASON,
    JOB_SILENT_SECONDS,
    SILENT_REASON,
)
from services.trainer.core.jobs import JobEvent
from services.trainer.core.store import TrainerStore
from services.trainer.core.trainer_service import TrainerService
from services.trainer.core.training_data import inspect_training_set, read_training_set
from tests.trainer_datasets import load_table, offline_store, take_up_rows, take_up_spec

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def trainer(database_url: str, tmp_path: Path) -> AsyncIterator[TrainerService]:
    """A trainer (not yet started) whose registry and offline store share one fresh database."""
    engine = offline_store(database_url)
    load_table(engine, "take_up", take_up_rows(400), tmp_path)
    apply_migrations(engine, schema.MIGRATIONS_PACKAGE, version_table=schema.VERSION_TABLE)
    reader = open_offline_store(database_url)
    service = TrainerService(
        TrainerStore(engine),
        reader,
        offline_store_url=database_url,
        artifact_dir=tmp_path / "artifacts",
        max_concurrent_jobs=1,
        config=None,
    )
    try:
        yield service
    finally:
        await service.stop()
        reader.dispose()
        engine.dispose()


async def events_of(service: TrainerService, job_id: str) -> list[JobEvent]:
    return [event async for event in service.watch(job_id, from_start=True)]


async def test_a_restart_fails_the_job_left_running_and_runs_the_queued_one(
    trainer: TrainerService, database_url: str, tmp_path: Path
) -> None:
    artifact_dir = tmp_path / "artifacts"
    store = trainer.store
    spec = take_up_spec()
    interrupted = store.create_job(spec, "alice")
    store.claim_job(interrupted.id)  # a trainer died while this one trained
    batch = store.create_job(spec, "training-x7k2p")
    store.claim_job(batch.id, "batch:training-x7k2p")  # a Kubernetes Job trains beside the service
    batch_staging = artifact_dir / BATCH_STAGING_DIR / batch.id
    batch_staging.mkdir(parents=True)
    waiting = store.create_job(spec, "alice")

    await trainer.start()

    failed = await trainer.get_job(interrupted.id)
    assert failed.state == "failed"
    assert failed.error == INTERRUPTED_REASON
    # Another runner's job and its staging directory are left alone while its heartbeat is fresh...
    assert (await trainer.get_job(batch.id)).state == "running"
    assert batch_staging.is_dir()
    assert await trainer.runner.sweep() == []
    # ... and failed, with its staging directory removed, once it has gone silent.
    with store.engine.begin() as connection:
        connection.execute(
            sa.update(schema.training_jobs)
            .where(schema.training_jobs.c.id == batch.id)
            .values(heartbeat_at=datetime.now(UTC) - timedelta(seconds=JOB_SILENT_SECONDS + 1))
        )
    assert await trainer.runner.sweep() == [batch.id]
    silent = await trainer.get_job(batch.id)
    assert (silent.state, silent.error) == ("failed", SILENT_REASON)
    assert not batch_staging.exists()
    events = await events_of(trainer, waiting.id)
    assert [e.state for e in events][-1] == "succeeded", events[-1].message
    assert [e.epoch for e in events if e.state == "running" and e.epoch] == [1, 2, 3]
    assert events[-1].model_version == 1

    # The failed job can be started again from its own spec (it queues behind nothing and runs).
    again = await trainer.start_training(failed.spec, author="alice", dry_run=False)
    assert again is not None
    assert again.state == "queued"
    assert again.spec == failed.spec

    # The worker trained exactly what this process trains from the same spec and data (checked once:
    # the rows read are the same on both backends, see test_trainer_store).
    if not database_url.startswith("sqlite"):
        return
    served = load_model(artifact_dir / "take-up" / "1", "take-up", 1)
    reader = open_offline_store(database_url)
    try:
        plan = inspect_training_set(reader, spec)
        data = read_training_set(reader, spec, plan)
    finally:
        reader.dispose()
    here = training.train_model(spec, plan, data)
    matrix = here.preprocessing.encode(data.columns)
    assert np.array_equal(served.predict(matrix), training.predict(here.model, matrix).astype(np.float32))
    record, _, _ = await trainer.get_model("take-up", 1)
    assert record.data_fingerprint == data.fingerprint
    assert record.metrics["auc"] == here.summary.test_metrics["auc"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # process handling only
async def test_stopping_the_trainer_fails_the_running_job_with_the_reason(
    trainer: TrainerService, database_url: str
) -> None:
    await trainer.start()
    spec = take_up_spec(hyperparameters={"epochs": 500}, early_stopping={"patience": 0})
    job = await trainer.start_training(spec, author="carol", dry_run=False)
    assert job is not None
    async for event in trainer.watch(job.id, from_start=True):
        if event.epoch >= 1:
            break
    await trainer.stop()
    stopped = await trainer.get_job(job.id)
    assert stopped.state == "failed"
    assert stopped.error == INTERRUPTED_REASON
    assert 1 <= stopped.epochs_done < 500
    with sa.create_engine(sa.make_url(database_url)).connect() as connection:
        assert connection.scalar(sa.text("SELECT COUNT(*) FROM model_versions")) == 0


# Two torchrun workers (DDP over gloo) reach the metrics of one process within these tolerances:
# the gradients are the same up to floating-point summation order.
DDP_LOG_LOSS_TOLERANCE = 1e-6  # measured: about 2e-9
DDP_AUC_TOLERANCE = 1e-3  # measured: 0 (a tie flipped by 1e-9 could move it by 1/(P*N))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the data read is backend-neutral
async def test_two_torchrun_workers_reach_the_metrics_of_one_process(
    trainer: TrainerService, database_url: str
) -> None:
    await trainer.start()
    spec = take_up_spec(workers=2, hyperparameters={"epochs": 2, "batch_size": 64, "hidden_sizes": [8]})
    job = await trainer.start_training(spec, author="erin", dry_run=False)
    assert job is not None
    events = await events_of(trainer, job.id)
    assert events[-1].state == "succeeded", events[-1].message
    assert [e.epoch for e in events if e.state == "running" and e.epoch] == [1, 2]
    record, _, _ = await trainer.get_model("take-up", 1)

    reader = open_offline_store(database_url)
    try:
        single = spec.model_copy(update={"workers": 1})
        plan = inspect_training_set(reader, single)
        here = training.train_model(single, plan, read_training_set(reader, single, plan))
    finally:
        reader.dispose()
    expected = here.summary.test_metrics
    assert abs(record.metrics["log_loss"] - expected["log_loss"]) <= DDP_LOG_LOSS_TOLERANCE
    assert abs(record.metrics["auc"] - expected["auc"]) <= DDP_AUC_TOLERANCE
    assert record.training_rows == here.summary.training_rows
