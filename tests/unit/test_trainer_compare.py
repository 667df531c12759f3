"""The pieces of Compare on an evaluation table, without a server: an artifact's preprocessing read
back, artifacts verified against the registry before anything is loaded, a loaded version scoring
rows exactly as training did, and a worker's typed error crossing back to the trainer."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from libs.common.errors import FailedPrecondition
from libs.common.model_artifacts import MANIFEST_FILE, MODEL_FILE, PREPROCESSING_FILE, REFERENCE_FILE
from services.trainer.core import training
from services.trainer.core.artifacts import read_verified_artifact
from services.trainer.core.evaluation import (
    EvaluationRunner,
    EvaluationTask,
    load_scoring_model,
    run_evaluation,
)
from services.trainer.core.metrics import binary_metrics
from services.trainer.core.preprocessing import Preprocessing
from services.trainer.core.store import ModelVersionRecord, seal_artifact
from services.trainer.core.training_data import EvaluationTablePlan
from tests.trainer_datasets import TrainedArtifact, take_up_spec, train_artifact

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedArtifact:
    scratch = tmp_path_factory.mktemp("trained")
    return train_artifact(scratch, scratch / "artifacts", take_up_spec(), rows=300)


def record_of(directory: Path, version: int = 1) -> ModelVersionRecord:
    """The registry's row for an artifact directory, its checksum that of the manifest now there."""
    return ModelVersionRecord(
        name="take-up",
        version=version,
        model_type="mlp",
        metrics={},
        features=[],
        label="label",
        training_set="take_up",
        data_fingerprint="",
        code_version="test",
        artifact_uri=directory.resolve().as_uri(),
        checksum=hashlib.sha256((directory / MANIFEST_FILE).read_bytes()).hexdigest(),
        hyperparameters={},
        seed=0,
        training_rows=0,
        description="",
        job_id="job-test",
        created_at=datetime.now(UTC),
    )


@pytest.fixture
def artifact(trained: TrainedArtifact, tmp_path: Path) -> Path:
    """A copy of the trained artifact this test may change."""
    copy = tmp_path / "take-up" / "1"
    shutil.copytree(trained.directory, copy)
    return copy


def reseal(directory: Path) -> None:
    """Rewrite the manifest over the files as they are now (as if registered so)."""
    staging = directory.parent / "staging"
    shutil.copytree(directory, staging)
    (staging / MANIFEST_FILE).unlink()
    seal_artifact(staging, directory, "take-up", 1)


def test_the_preprocessing_an_artifact_records_reads_back_equal(trained: TrainedArtifact) -> None:
    fitted = trained.outcome.preprocessing
    assert Preprocessing.from_json(json.loads((trained.directory / PREPROCESSING_FILE).read_text())) == fitted
    document = fitted.to_json()
    with pytest.raises(ValueError, match="unknown preprocessing format"):
        Preprocessing.from_json({**document, "format": "other/1"})
    with pytest.raises(ValueError, match="inputs but"):
        Preprocessing.from_json({**document, "inputs": document["inputs"][:-1]})


def test_a_loaded_version_scores_the_test_rows_as_training_did(
    trained: TrainedArtifact, artifact: Path
) -> None:
    verified = read_verified_artifact(record_of(artifact), field="version_a")
    assert set(verified.files) == {MODEL_FILE, PREPROCESSING_FILE, REFERENCE_FILE}
    model = load_scoring_model(verified, "version_a")
    data = trained.data
    test = training.split_rows(take_up_spec().split, data, take_up_spec().seed).test
    scores = model.score({name: values[test] for name, values in data.columns.items()})
    measured = binary_metrics(data.labels[test], scores)
    for metric, value in measured.items():
        assert value == pytest.approx(trained.outcome.summary.test_metrics[metric], rel=1e-9, abs=1e-12)


def test_a_changed_file_is_refused_before_anything_is_loaded(artifact: Path) -> None:
    record = record_of(artifact)
    with (artifact / MODEL_FILE).open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(FailedPrecondition) as raised:
        read_verified_artifact(record, field="version_b")
    assert raised.value.field == "version_b"
    assert "checksum mismatch for model.pt" in raised.value.message


def test_a_manifest_rewritten_after_registration_is_refused(artifact: Path) -> None:
    record = record_of(artifact)
    with (artifact / MODEL_FILE).open("ab") as handle:
        handle.write(b"\0")
    reseal(artifact)  # the files agree with the manifest again, but not with the registry
    with pytest.raises(FailedPrecondition) as raised:
        read_verified_artifact(record, field="version_a")
    assert "is not the registered one" in raised.value.message
    (artifact / MANIFEST_FILE).unlink()
    with pytest.raises(FailedPrecondition, match="cannot read"):
        read_verified_artifact(record, field="version_a")
    with pytest.raises(FailedPrecondition, match="not a file:// URI"):
        read_verified_artifact(dataclasses.replace(record, artifact_uri="s3://bucket/x"), field="version_a")


def inconsistent(artifact: Path) -> ModelVersionRecord:
    """An artifact registered with reference predictions its model does not make."""
    reference = json.loads((artifact / REFERENCE_FILE).read_text())
    reference["predictions"] = [p + 0.01 for p in reference["predictions"]]
    (artifact / REFERENCE_FILE).write_text(json.dumps(reference))
    reseal(artifact)
    return record_of(artifact)


def test_a_model_that_does_not_reproduce_its_reference_rows_is_refused(artifact: Path) -> None:
    verified = read_verified_artifact(inconsistent(artifact), field="version_a")
    with pytest.raises(FailedPrecondition) as raised:
        load_scoring_model(verified, "version_a")
    assert raised.value.field == "version_a"
    assert "does not reproduce the trainer's predictions" in raised.value.message


def task_for(artifact: Path, tmp_path: Path) -> EvaluationTask:
    plan = EvaluationTablePlan("take_up", {}, True, "label", (), (), row_count=1, positives=1)
    verified = read_verified_artifact(inconsistent(artifact), field="version_b")
    return EvaluationTask(f"sqlite:///{tmp_path / 'none.db'}", plan, (("version_b", verified),), max_rows=10)


def test_a_worker_reports_its_typed_error_over_the_pipe(artifact: Path, tmp_path: Path) -> None:
    receiver, sender = multiprocessing.Pipe(duplex=False)
    run_evaluation(task_for(artifact, tmp_path), sender)
    kind, (error_class, message, field) = receiver.recv()
    assert (kind, error_class, field) == ("error", FailedPrecondition, "version_b")
    assert message.startswith("model 'take-up' version 1: does not reproduce")


async def test_a_spawned_worker_s_error_is_raised_again_in_the_trainer(
    artifact: Path, tmp_path: Path
) -> None:
    runner = EvaluationRunner(max_concurrent=1)
    try:
        with pytest.raises(FailedPrecondition) as raised:
            await runner.evaluate(task_for(artifact, tmp_path))
    finally:
        await runner.stop()
    assert raised.value.field == "version_b"
    assert raised.value.message.startswith("version_b: model 'take-up' version 1: does not reproduce")
