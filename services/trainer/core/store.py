"""The trainer's SQL store: training jobs with their event log, and the model registry.

Synchronous (SQLAlchemy Core); the service calls it through asyncio.to_thread. Every state change
of a job and its event are written in one transaction, so WatchJob never sees one without the other.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from libs.common.database import write_transaction
from libs.common.distribution_drift import TrainingReference
from libs.common.errors import FailedPrecondition, NotFound
from libs.common.model_artifacts import MANIFEST_FILE, MANIFEST_FORMAT
from libs.common.training_spec import TrainingJobSpec
from services.trainer.core.jobs import (
    TRAINING_REFERENCE_FILE,
    EpochReport,
    JobEvent,
    JobRecord,
    JobState,
    TrainingSummary,
    finite_or_none,
    metrics_json,
)
from services.trainer.core.schema import model_versions, models, training_job_events, training_jobs

SERVICE_RUNNER = "service"  # the trainer service's runner; a batch run is "batch:<who>"
# Every column of a version but its training reference, which can be long and only one RPC reads.
_VERSION_COLUMNS = [column for column in model_versions.c if column.name != "training_reference"]


@dataclass(frozen=True)
class ModelVersionRecord:
    name: str
    version: int
    model_type: str
    metrics: dict[str, float | None]
    features: list[dict[str, str]]
    label: str
    training_set: str
    data_fingerprint: str
    code_version: str
    artifact_uri: str
    checksum: str
    hyperparameters: dict[str, Any]
    seed: int
    training_rows: int
    description: str
    job_id: str
    created_at: datetime


@dataclass(frozen=True)
class ModelSummaryRecord:
    name: str
    latest_version: int
    version_count: int
    updated_at: datetime
    latest: ModelVersionRecord


def _now() -> datetime:
    return datetime.now(UTC)


def _job(row: Any) -> JobRecord:
    m = row._mapping
    return JobRecord(
        id=m["id"],
        model_name=m["model_name"],
        spec=TrainingJobSpec.model_validate_json(m["spec"]),
        state=m["state"],
        epochs_done=int(m["epochs_done"]),
        max_epochs=int(m["max_epochs"]),
        progress=float(m["progress"]),
        error=m["error"],
        author=m["author"],
        created_at=m["created_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        model_version=int(m["model_version"]) if m["model_version"] is not None else None,
    )


def _version(row: Any) -> ModelVersionRecord:
    m = row._mapping
    return ModelVersionRecord(
        name=m["name"],
        version=int(m["version"]),
        model_type=m["model_type"],
        metrics=json.loads(m["metrics"]),
        features=json.loads(m["features"]),
        label=m["label"],
        training_set=m["training_set"],
        data_fingerprint=m["data_fingerprint"],
        code_version=m["code_version"],
        artifact_uri=m["artifact_uri"],
        checksum=m["checksum"],
        hyperparameters=json.loads(m["hyperparameters"]),
        seed=int(m["seed"]),
        training_rows=int(m["training_rows"]),
        description=m["description"],
        job_id=m["job_id"],
        created_at=m["created_at"],
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class TrainerStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # Jobs ---------------------------------------------------------------------------------------

    def create_job(self, spec: TrainingJobSpec, author: str) -> JobRecord:
        job_id = f"job-{uuid.uuid4().hex[:16]}"
        now = _now()
        with write_transaction(self.engine) as connection:
            connection.execute(
                sa.insert(training_jobs).values(
                    id=job_id,
                    model_name=spec.model_name,
                    spec=spec.canonical_json(),
                    state="queued",
                    epochs_done=0,
                    max_epochs=spec.hyperparameters.epochs,
                    progress=0.0,
                    error="",
                    author=author,
                    created_at=now,
                )
            )
            self._append_event(
                connection,
                JobEvent(job_id, 0, "queued", now, max_epochs=spec.hyperparameters.epochs, message="queued"),
            )
            return self._locked_job(connection, job_id)

    def get_job(self, job_id: str) -> JobRecord:
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(training_jobs).where(training_jobs.c.id == job_id)).first()
        if row is None:
            raise NotFound(f"no training job '{job_id}'", field="job_id")
        return _job(row)

    def list_jobs(
        self, *, state: str = "", model_name: str = "", limit: int = 50, offset: int = 0
    ) -> tuple[list[JobRecord], int]:
        conditions = []
        if state:
            conditions.append(training_jobs.c.state == state)
        if model_name:
            conditions.append(training_jobs.c.model_name == model_name)
        query = (
            sa.select(training_jobs)
            .where(*conditions)
            .order_by(training_jobs.c.created_at.desc(), training_jobs.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        with self.engine.connect() as connection:
            rows = connection.execute(query).fetchall()
            total = int(
                connection.scalar(sa.select(sa.func.count()).select_from(training_jobs).where(*conditions))
                or 0
            )
        return [_job(row) for row in rows], total

    def queued_job_ids(self) -> list[str]:
        with self.engine.connect() as connection:
            return list(
                connection.scalars(
                    sa.select(training_jobs.c.id)
                    .where(training_jobs.c.state == "queued")
                    .order_by(training_jobs.c.created_at, training_jobs.c.id)
                )
            )

    def claim_job(self, job_id: str, runner: str = SERVICE_RUNNER) -> JobRecord | None:
        """queued -> running, by `runner`; None when the job is no longer queued (cancelled, or
        claimed by another runner meanwhile)."""
        now = _now()
        with write_transaction(self.engine) as connection:
            job = self._locked_job(connection, job_id)
            if job.state != "queued":
                return None
            connection.execute(
                sa.update(training_jobs)
                .where(training_jobs.c.id == job_id)
                .values(state="running", started_at=now, runner=runner, heartbeat_at=now)
            )
            self._append_event(
                connection,
                JobEvent(job_id, 0, "running", now, max_epochs=job.max_epochs, message="training started"),
            )
            return self._locked_job(connection, job_id)

    def record_epoch(self, job_id: str, report: EpochReport) -> None:
        with write_transaction(self.engine) as connection:
            job = self._locked_job(connection, job_id)
            if job.state != "running":
                return
            connection.execute(
                sa.update(training_jobs)
                .where(training_jobs.c.id == job_id)
                .values(
                    epochs_done=report.epoch,
                    max_epochs=report.max_epochs,
                    progress=report.epoch / report.max_epochs if report.max_epochs else 0.0,
                )
            )
            self._append_event(
                connection,
                JobEvent(
                    job_id,
                    0,
                    "running",
                    _now(),
                    epoch=report.epoch,
                    max_epochs=report.max_epochs,
                    loss=report.loss,
                    validation_loss=report.validation_loss,
                    metrics={k: v for k, v in report.metrics.items()},
                    eta_seconds=report.eta_seconds,
                    elapsed_seconds=report.elapsed_seconds,
                    rows_per_second=report.rows_per_second,
                    message=f"epoch {report.epoch}/{report.max_epochs}",
                ),
            )

    def finish_job(self, job_id: str, state: JobState, message: str) -> JobRecord:
        """Moves an unfinished job to failed or cancelled; a finished job is returned unchanged."""
        assert state in ("failed", "cancelled")
        now = _now()
        with write_transaction(self.engine) as connection:
            job = self._locked_job(connection, job_id)
            if job.final:
                return job
            connection.execute(
                sa.update(training_jobs)
                .where(training_jobs.c.id == job_id)
                .values(state=state, error=message, finished_at=now)
            )
            self._append_event(
                connection,
                JobEvent(
                    job_id,
                    0,
                    state,
                    now,
                    epoch=job.epochs_done,
                    max_epochs=job.max_epochs,
                    eta_seconds=0.0,
                    message=message,
                ),
            )
            return self._locked_job(connection, job_id)

    def fail_interrupted_jobs(self, reason: str, runner: str = SERVICE_RUNNER) -> list[str]:
        """At start: jobs this runner left running cannot be resumed; they fail. Jobs of other
        runners (a batch run training beside the service) are left to their heartbeats."""
        with self.engine.connect() as connection:
            running = list(
                connection.scalars(
                    sa.select(training_jobs.c.id).where(
                        training_jobs.c.state == "running",
                        sa.or_(training_jobs.c.runner == runner, training_jobs.c.runner.is_(None)),
                    )
                )
            )
        for job_id in running:
            self.finish_job(job_id, "failed", reason)
        return running

    def beat(self, job_ids: Sequence[str]) -> None:
        """The runner of these jobs still runs them."""
        if not job_ids:
            return
        with write_transaction(self.engine) as connection:
            connection.execute(
                sa.update(training_jobs)
                .where(training_jobs.c.id.in_(list(job_ids)), training_jobs.c.state == "running")
                .values(heartbeat_at=_now())
            )

    def fail_silent_jobs(self, reason: str, older_than: datetime) -> list[str]:
        """Running jobs of other runners whose last heartbeat is older than `older_than` (a batch run
        that was killed without a word): they fail."""
        with self.engine.connect() as connection:
            silent = list(
                connection.scalars(
                    sa.select(training_jobs.c.id).where(
                        training_jobs.c.state == "running",
                        training_jobs.c.runner != SERVICE_RUNNER,
                        training_jobs.c.heartbeat_at < older_than,
                    )
                )
            )
        for job_id in silent:
            self.finish_job(job_id, "failed", reason)
        return silent

    def events_after(self, job_id: str, sequence: int) -> list[JobEvent]:
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.select(training_job_events)
                .where(training_job_events.c.job_id == job_id, training_job_events.c.sequence > sequence)
                .order_by(training_job_events.c.sequence)
            ).fetchall()
        return [
            JobEvent.from_payload(row.job_id, int(row.sequence), row.created_at, row.event) for row in rows
        ]

    def _locked_job(self, connection: Connection, job_id: str) -> JobRecord:
        row = connection.execute(
            sa.select(training_jobs).where(training_jobs.c.id == job_id).with_for_update()
        ).first()
        if row is None:
            raise NotFound(f"no training job '{job_id}'", field="job_id")
        return _job(row)

    @staticmethod
    def _append_event(connection: Connection, event: JobEvent) -> None:
        last = connection.scalar(
            sa.select(sa.func.max(training_job_events.c.sequence)).where(
                training_job_events.c.job_id == event.job_id
            )
        )
        connection.execute(
            sa.insert(training_job_events).values(
                job_id=event.job_id,
                sequence=int(last or 0) + 1,
                event=event.payload(),
                created_at=event.time,
            )
        )

    # Registry -----------------------------------------------------------------------------------

    def register_version(
        self,
        job_id: str,
        summary: TrainingSummary,
        staging_dir: Path,
        artifact_root: Path,
        code_version: str,
    ) -> ModelVersionRecord:
        """Number the next version, move the artifact in place with its manifest, record it with
        the training reference the worker left beside it, and mark the job succeeded: all or nothing
        (a failed insert removes the moved directory)."""
        now = _now()
        reference = read_training_reference(staging_dir)
        final_dir: Path | None = None
        try:
            with write_transaction(self.engine) as connection:
                job = self._locked_job(connection, job_id)
                if job.state != "running":
                    raise FailedPrecondition(f"job '{job_id}' is {job.state}, not running")
                spec = job.spec
                version = self._next_version(connection, spec.model_name, now)
                final_dir = artifact_root / spec.model_name / str(version)
                checksum = seal_artifact(staging_dir, final_dir, spec.model_name, version)
                metrics = summary.test_metrics
                connection.execute(
                    sa.insert(model_versions).values(
                        name=spec.model_name,
                        version=version,
                        model_type=spec.model_type.value,
                        auc=finite_or_none(metrics["auc"]),
                        log_loss=metrics["log_loss"],
                        calibration_error=metrics["calibration_error"],
                        brier_score=metrics["brier_score"],
                        test_rows=summary.test_rows,
                        metrics=metrics_json(
                            {
                                **metrics,
                                **{f"validation_{k}": v for k, v in summary.validation_metrics.items()},
                                "epochs_trained": float(summary.epochs_trained),
                                "best_epoch": float(summary.best_epoch),
                                "validation_rows": float(summary.validation_rows),
                            }
                        ),
                        features=json.dumps(summary.features),
                        label=spec.label,
                        training_set=spec.source,
                        data_fingerprint=summary.data_fingerprint,
                        code_version=code_version,
                        artifact_uri=final_dir.resolve().as_uri(),
                        checksum=checksum,
                        hyperparameters=json.dumps(
                            spec.hyperparameters.model_dump(mode="json"), sort_keys=True
                        ),
                        seed=spec.seed,
                        training_rows=summary.training_rows,
                        description=spec.description,
                        job_id=job_id,
                        created_at=now,
                        training_reference=None
                        if reference is None
                        else json.dumps(
                            reference.for_version(spec.model_name, version).to_json(), allow_nan=False
                        ),
                    )
                )
                connection.execute(
                    sa.update(training_jobs)
                    .where(training_jobs.c.id == job_id)
                    .values(state="succeeded", finished_at=now, model_version=version, progress=1.0)
                )
                self._append_event(
                    connection,
                    JobEvent(
                        job_id,
                        0,
                        "succeeded",
                        now,
                        epoch=summary.epochs_trained,
                        max_epochs=job.max_epochs,
                        metrics={k: v for k, v in summary.test_metrics.items()},
                        eta_seconds=0.0,
                        message=f"registered {spec.model_name} version {version}",
                        model_name=spec.model_name,
                        model_version=version,
                    ),
                )
                row = connection.execute(
                    sa.select(*_VERSION_COLUMNS).where(
                        model_versions.c.name == spec.model_name, model_versions.c.version == version
                    )
                ).one()
                return _version(row)
        except BaseException:
            if final_dir is not None:
                shutil.rmtree(final_dir, ignore_errors=True)
            raise

    @staticmethod
    def _next_version(connection: Connection, name: str, now: datetime) -> int:
        updated = connection.execute(
            sa.update(models)
            .where(models.c.name == name)
            .values(latest_version=models.c.latest_version + 1, updated_at=now)
            .returning(models.c.latest_version)
        ).first()
        if updated is not None:
            return int(updated[0])
        connection.execute(
            sa.insert(models).values(name=name, latest_version=1, created_at=now, updated_at=now)
        )
        return 1

    def get_version(
        self, name: str, version: int = 0, *, name_field: str = "name", version_field: str = "version"
    ) -> tuple[ModelVersionRecord, list[int]]:
        """The version (0: the newest) and every version number of the model, ascending."""
        with self.engine.connect() as connection:
            versions = [
                int(v)
                for v in connection.scalars(
                    sa.select(model_versions.c.version)
                    .where(model_versions.c.name == name)
                    .order_by(model_versions.c.version)
                )
            ]
            if not versions:
                raise NotFound(f"no model '{name}' in the registry", field=name_field)
            wanted = version or versions[-1]
            row = connection.execute(
                sa.select(*_VERSION_COLUMNS).where(
                    model_versions.c.name == name, model_versions.c.version == wanted
                )
            ).first()
        if row is None:
            raise NotFound(
                f"model '{name}' has no version {wanted} (it has {', '.join(map(str, versions))})",
                field=version_field,
            )
        return _version(row), versions

    def get_training_reference(self, name: str, version: int = 0) -> TrainingReference:
        """The training reference of a version (0: the newest); NotFound when the model or the
        version does not exist, or the version was registered before the trainer recorded one."""
        record, _ = self.get_version(name, version)
        with self.engine.connect() as connection:
            stored = connection.scalar(
                sa.select(model_versions.c.training_reference).where(
                    model_versions.c.name == name, model_versions.c.version == record.version
                )
            )
        if stored is None:
            raise NotFound(
                f"model '{name}' version {record.version} has no training reference (it was registered "
                "before the trainer recorded one); retrain it to get one",
                field="version",
            )
        return TrainingReference.from_json(json.loads(stored))

    def list_models(
        self, *, name_prefix: str = "", limit: int = 50, offset: int = 0
    ) -> tuple[list[ModelSummaryRecord], int]:
        conditions = [models.c.name.startswith(name_prefix, autoescape=True)] if name_prefix else []
        counts = (
            sa.select(model_versions.c.name, sa.func.count().label("version_count"))
            .group_by(model_versions.c.name)
            .subquery()
        )
        query = (
            sa.select(
                *_VERSION_COLUMNS, counts.c.version_count, models.c.updated_at.label("model_updated_at")
            )
            .join(
                models,
                sa.and_(
                    models.c.name == model_versions.c.name,
                    models.c.latest_version == model_versions.c.version,
                ),
            )
            .join(counts, counts.c.name == model_versions.c.name)
            .where(*conditions)
            .order_by(models.c.name)
            .limit(limit)
            .offset(offset)
        )
        with self.engine.connect() as connection:
            rows = connection.execute(query).fetchall()
            total = int(
                connection.scalar(sa.select(sa.func.count()).select_from(models).where(*conditions)) or 0
            )
        summaries = [
            ModelSummaryRecord(
                name=row.name,
                latest_version=int(row.version),
                version_count=int(row.version_count),
                updated_at=row.model_updated_at,
                latest=_version(row),
            )
            for row in rows
        ]
        return summaries, total


def read_training_reference(staging_dir: Path) -> TrainingReference | None:
    """The training reference a worker left in its staging directory; None when there is none (a
    worker of an older trainer). ValueError when the file is not one."""
    path = staging_dir / TRAINING_REFERENCE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return TrainingReference.from_json(json.loads(text))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} is not a training reference: {exc!r}") from None


def manifest_bytes(name: str, version: int, files: dict[str, str]) -> bytes:
    document = {"format": MANIFEST_FORMAT, "model": name, "version": version, "files": files}
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def seal_artifact(staging_dir: Path, final_dir: Path, name: str, version: int) -> str:
    """Write the manifest (SHA-256 of every file) and move the directory in place; returns the
    SHA-256 of the manifest, the artifact's checksum. The worker's training reference is removed
    first: it is no part of the artifact (the registry keeps it in SQL; see read_training_reference)."""
    (staging_dir / TRAINING_REFERENCE_FILE).unlink(missing_ok=True)
    files = {
        path.name: sha256_file(path)
        for path in sorted(staging_dir.iterdir())
        if path.is_file() and path.name != MANIFEST_FILE
    }
    manifest = manifest_bytes(name, version, files)
    (staging_dir / MANIFEST_FILE).write_bytes(manifest)
    if final_dir.exists():  # left by a registration that failed after the move: no row points to it
        shutil.rmtree(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging_dir, final_dir)
    return hashlib.sha256(manifest).hexdigest()
