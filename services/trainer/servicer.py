"""gRPC face of the trainer service: protobuf <-> domain only; the logic lives in core/."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from libs.common.auth import CALLER
from libs.common.errors import InvalidArgument
from libs.common.training_messages import MODEL_TYPE_VALUES, spec_from_message, spec_message, struct_value
from libs.protos.liveloop.common.v1 import common_pb2
from libs.protos.liveloop.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.core.jobs import JobEvent, JobRecord
from services.trainer.core.store import ModelVersionRecord
from services.trainer.core.trainer_service import ModelUse, TrainerService

_STATES = {
    "queued": trainer_pb2.JOB_STATE_QUEUED,
    "running": trainer_pb2.JOB_STATE_RUNNING,
    "succeeded": trainer_pb2.JOB_STATE_SUCCEEDED,
    "failed": trainer_pb2.JOB_STATE_FAILED,
    "cancelled": trainer_pb2.JOB_STATE_CANCELLED,
}
_STATE_NAMES = {value: name for name, value in _STATES.items()}
_MODEL_USES = {
    trainer_pb2.MODEL_USE_UNSPECIFIED: ModelUse.BIND,
    trainer_pb2.MODEL_USE_SCORE: ModelUse.SCORE,
    trainer_pb2.MODEL_USE_PRIOR: ModelUse.PRIOR,
}
_CORE_METRICS = ("auc", "log_loss", "calibration_error", "brier_score", "rows")


def timestamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    value = Timestamp()
    value.FromDatetime(moment)
    return value


def job_message(job: JobRecord) -> trainer_pb2.Job:
    return trainer_pb2.Job(
        job_id=job.id,
        spec=spec_message(job.spec),
        state=_STATES[job.state],
        created_at=timestamp(job.created_at),
        started_at=timestamp(job.started_at),
        finished_at=timestamp(job.finished_at),
        error=job.error,
        epochs_done=job.epochs_done,
        model=common_pb2.ModelRef(name=job.model_name, version=job.model_version)
        if job.model_version
        else None,
        author=job.author,
    )


def event_message(event: JobEvent) -> trainer_pb2.JobEvent:
    return trainer_pb2.JobEvent(
        job_id=event.job_id,
        state=_STATES[event.state],
        epoch=event.epoch,
        max_epochs=event.max_epochs,
        loss=event.loss,
        validation_loss=event.validation_loss,
        metrics=event.metrics,
        eta_seconds=event.eta_seconds,
        time=timestamp(event.time),
        message=event.message,
        model=common_pb2.ModelRef(name=event.model_name, version=event.model_version)
        if event.model_version
        else None,
        progress=common_pb2.Progress(
            done=event.epoch,
            total=event.max_epochs,
            rate=event.rows_per_second,
            unit="epochs",
            message=event.message,
            stage=event.state,
            elapsed_seconds=event.elapsed_seconds,
            eta_seconds=event.eta_seconds,
        ),
    )


def _metric(metrics: Mapping[str, float | None], name: str) -> float:
    value = metrics.get(name)
    return math.nan if value is None else float(value)


def metrics_message(metrics: Mapping[str, float | None]) -> trainer_pb2.ModelMetrics:
    return trainer_pb2.ModelMetrics(
        auc=_metric(metrics, "auc"),
        log_loss=_metric(metrics, "log_loss"),
        calibration_error=_metric(metrics, "calibration_error"),
        brier_score=_metric(metrics, "brier_score"),
        rows=int(metrics.get("rows") or 0),
        other={k: float(v) for k, v in metrics.items() if k not in _CORE_METRICS and v is not None},
    )


def version_message(
    record: ModelVersionRecord, deployments: list[str] | None = None
) -> trainer_pb2.ModelVersion:
    return trainer_pb2.ModelVersion(
        name=record.name,
        version=record.version,
        model_type=MODEL_TYPE_VALUES.get(record.model_type, trainer_pb2.MODEL_TYPE_UNSPECIFIED),
        metrics=metrics_message(record.metrics),
        features=[
            trainer_pb2.ModelFeature(name=f["name"], dtype=f["dtype"], encoding=f["encoding"])
            for f in record.features
        ],
        label=record.label,
        training_set=record.training_set,
        data_fingerprint=record.data_fingerprint,
        code_version=record.code_version,
        artifact_uri=record.artifact_uri,
        checksum=record.checksum,
        created_at=timestamp(record.created_at),
        job_id=record.job_id,
        hyperparameters={key: struct_value(value) for key, value in record.hyperparameters.items()},
        seed=record.seed,
        training_rows=record.training_rows,
        deployments=deployments or [],
        description=record.description,
    )


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, service: TrainerService) -> None:
        self._service = service

    async def StartTraining(
        self, request: trainer_pb2.StartTrainingRequest, context: Any
    ) -> trainer_pb2.StartTrainingResponse:
        if not request.HasField("spec"):
            raise InvalidArgument("a training spec is required", field="spec")
        spec = spec_from_message(request.spec)
        job = await self._service.start_training(spec, author=CALLER.get(), dry_run=request.dry_run)
        if job is None:
            return trainer_pb2.StartTrainingResponse()
        return trainer_pb2.StartTrainingResponse(job_id=job.id, state=_STATES[job.state])

    async def WatchJob(
        self, request: trainer_pb2.WatchJobRequest, context: Any
    ) -> AsyncIterator[trainer_pb2.JobEvent]:
        async for event in self._service.watch(request.job_id, request.from_start):
            yield event_message(event)

    async def CancelJob(
        self, request: trainer_pb2.CancelJobRequest, context: Any
    ) -> trainer_pb2.CancelJobResponse:
        job = await self._service.cancel(request.job_id, request.reason)
        return trainer_pb2.CancelJobResponse(state=_STATES[job.state])

    async def ListJobs(
        self, request: trainer_pb2.ListJobsRequest, context: Any
    ) -> trainer_pb2.ListJobsResponse:
        if request.state and request.state not in _STATE_NAMES:
            raise InvalidArgument(f"unknown job state {request.state}", field="state")
        jobs, total, following = await self._service.list_jobs(
            state=_STATE_NAMES.get(request.state, ""),
            model_name=request.model_name,
            page_size=request.page.page_size,
            page_token=request.page.page_token,
        )
        return trainer_pb2.ListJobsResponse(
            jobs=[job_message(job) for job in jobs],
            page=common_pb2.PageResponse(next_page_token=following, total_size=total),
        )

    async def ListModels(
        self, request: trainer_pb2.ListModelsRequest, context: Any
    ) -> trainer_pb2.ListModelsResponse:
        models, total, following, bindings = await self._service.list_models(
            name_prefix=request.name_prefix,
            page_size=request.page.page_size,
            page_token=request.page.page_token,
        )
        return trainer_pb2.ListModelsResponse(
            models=[
                trainer_pb2.ModelSummary(
                    name=model.name,
                    latest_version=model.latest_version,
                    version_count=model.version_count,
                    updated_at=timestamp(model.updated_at),
                    latest_metrics=metrics_message(model.latest.metrics),
                    deployments=[
                        common_pb2.DeploymentRef(name=deployment, revision=version)
                        for deployment, (name, version) in sorted(bindings.items())
                        if name == model.name
                    ],
                )
                for model in models
            ],
            page=common_pb2.PageResponse(next_page_token=following, total_size=total),
        )

    async def GetModel(
        self, request: trainer_pb2.GetModelRequest, context: Any
    ) -> trainer_pb2.GetModelResponse:
        record, versions, deployments = await self._service.get_model(request.name, request.version)
        model = version_message(record, deployments)
        model.input_columns.extend(await self._service.input_columns(record))
        return trainer_pb2.GetModelResponse(model=model, versions=versions)

    async def GetTrainingReference(
        self, request: trainer_pb2.GetTrainingReferenceRequest, context: Any
    ) -> trainer_pb2.GetTrainingReferenceResponse:
        reference = await self._service.get_training_reference(request.name, request.version)
        return trainer_pb2.GetTrainingReferenceResponse(
            model=common_pb2.ModelRef(name=reference.model_name, version=reference.model_version),
            reference_json=json.dumps(reference.to_json(), allow_nan=False),
            inputs=list(reference.inputs),
            rows=reference.rows,
            created_at=timestamp(reference.created_at),
        )

    async def Compare(self, request: trainer_pb2.CompareRequest, context: Any) -> trainer_pb2.CompareResponse:
        comparison = await self._service.compare(
            request.name, request.version_a, request.version_b, request.evaluation_table
        )
        return trainer_pb2.CompareResponse(
            a=version_message(comparison.a),
            b=version_message(comparison.b),
            deltas=[
                trainer_pb2.MetricDelta(metric=metric, a=a, b=b, delta=delta, b_better=better)
                for metric, a, b, delta, better in comparison.deltas
            ],
            features_added=comparison.features_added,
            features_removed=comparison.features_removed,
            same_data=comparison.same_data,
            evaluated_rows=comparison.evaluated_rows,
        )

    async def Promote(self, request: trainer_pb2.PromoteRequest, context: Any) -> trainer_pb2.PromoteResponse:
        use = _MODEL_USES.get(request.use)
        if use is None:
            raise InvalidArgument(f"unknown model use {request.use}", field="use")
        result = await self._service.promote(
            request.model,
            request.version,
            request.deployment,
            dry_run=request.dry_run,
            message=request.message,
            use=use,
            prior_weight=request.prior_weight,
        )
        return trainer_pb2.PromoteResponse(
            config_revision=result.revision,
            deployment=result.deployment,
            diff=result.diff,
            model=common_pb2.ModelRef(name=result.model, version=result.version),
        )
