"""The batch entrypoint the Kubernetes training Job runs (`python -m services.trainer.batch SPEC`):
one job, trained under torchrun with two DDP workers, registered in the trainer's SQL store with a
checksummed artifact that a predictor loads, exactly like a job the service runs itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from libs.common.database import create_database_engine
from libs.policy.models import load_model
from services.trainer.core.store import TrainerStore
from tests.trainer_datasets import load_table, offline_store, take_up_rows, take_up_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]


def batch(
    spec: dict[str, Any], tmp_path: Path, database_url: str, offline_url: str
) -> tuple[int, list[dict[str, Any]]]:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    env = {
        **os.environ,
        "LIVELOOP_TRAINER_DATABASE_URL": database_url,
        "LIVELOOP_TRAINER_OFFLINE_STORE_URL": offline_url,
        "LIVELOOP_TRAINER_ARTIFACT_DIR": str(tmp_path / "artifacts"),
    }
    finished = subprocess.run(
        [sys.executable, "-m", "services.trainer.batch", str(spec_file), "--author", "batch:test"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    lines = [json.loads(line) for line in finished.stdout.splitlines() if line.startswith("{")]
    return finished.returncode, lines


@pytest.fixture
def offline_url(database_url: str, tmp_path: Path) -> str:
    engine = offline_store(database_url)  # the offline store in the same database, as in Kubernetes
    load_table(engine, "take_up", take_up_rows(300), tmp_path)
    engine.dispose()
    return database_url


def test_a_batch_run_trains_under_torchrun_and_registers_the_version(
    tmp_path: Path, database_url: str, offline_url: str
) -> None:
    spec = take_up_spec(workers=2).model_dump(mode="json")
    code, lines = batch(spec, tmp_path, database_url, offline_url)
    assert code == 0, lines
    events = [line["event"] for line in lines]
    assert (events[0], events[-1]) == ("started", "registered"), events
    assert events.count("epoch") == 3
    registered = lines[-1]
    assert (registered["model"], registered["version"]) == ("take-up", 1)
    engine = create_database_engine(database_url)
    try:
        store = TrainerStore(engine)
        job = store.get_job(registered["job_id"])
        assert (job.state, job.author, job.model_version, job.spec.workers) == (
            "succeeded",
            "batch:test",
            1,
            2,
        )
        version, _ = store.get_version("take-up", 1)
    finally:
        engine.dispose()
    artifact = tmp_path / "artifacts" / "take-up" / "1"
    assert version.artifact_uri == artifact.as_uri()
    model = load_model(artifact, "take-up", 1)  # checksums verified, as a predictor loads it
    assert model.checksum == version.checksum
    # A second run is the next version; nothing of the first is touched.
    code, lines = batch(take_up_spec(seed=9).model_dump(mode="json"), tmp_path, database_url, offline_url)
    assert code == 0, lines
    assert lines[-1]["version"] == 2
    assert load_model(artifact, "take-up", 1).checksum == version.checksum


def test_a_spec_the_data_cannot_satisfy_exits_2_and_records_nothing(
    tmp_path: Path, database_url: str, offline_url: str
) -> None:
    spec = take_up_spec().model_dump(mode="json") | {"label": "took_it"}
    code, lines = batch(spec, tmp_path, database_url, offline_url)
    assert code == 2
    assert lines == [
        {"event": "refused", "field": "spec.label", "message": lines[0]["message"]},
    ]
    assert "no column 'took_it'" in lines[0]["message"]
    engine = create_database_engine(database_url)
    try:
        with engine.connect() as connection:
            assert connection.scalar(sa.text("SELECT COUNT(*) FROM training_jobs")) == 0
    finally:
        engine.dispose()
