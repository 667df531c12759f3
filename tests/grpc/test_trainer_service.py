"""The trainer over gRPC: jobs in real spawned workers, the registry, comparison and promotion.

The trainer is built as `python -m services.trainer` builds it (auth on, interceptors, SQLite
files); its offline store is a SQLite file loaded through ingest's own loader, and promotion
publishes to a real config service on its own port.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import json_format, struct_pb2
from grpc import aio

from libs.common.client import open_channel
from libs.common.server import RunningServer
from libs.protos.liveloop.common.v1 import common_pb2
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc
from libs.protos.liveloop.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.config.server import build_server as build_config
from services.trainer.server import build_server as build_trainer
from tests.conftest import ApiKeys
from tests.grpc.conftest import SERVICES_UNDER_TEST, target
from tests.trainer_datasets import OFFERS, load_table, offline_store, take_up_rows

pytestmark = pytest.mark.timeout(60)

FEATURES = ["age", "tenure_months", "region:one_hot", "offer_id:offer"]


def training_spec(model: str = "take-up", **overrides: Any) -> trainer_pb2.TrainingSpec:
    hyperparameters = {"learning_rate": 0.05, "batch_size": 128, "hidden_sizes": [8]}
    values: dict[str, Any] = {
        "model_name": model,
        "training_set": "take_up",
        "label": "label",
        "features": FEATURES,
        "model_type": trainer_pb2.MODEL_TYPE_MLP,
        "max_epochs": 4,
        "seed": 11,
        **overrides,
    }
    spec = trainer_pb2.TrainingSpec(**values)
    for key, value in hyperparameters.items():
        spec.hyperparameters[key].CopyFrom(json_format.ParseDict(value, struct_pb2.Value()))
    return spec


@dataclass
class Stack:
    trainer: trainer_pb2_grpc.TrainerServiceStub
    config: config_pb2_grpc.ConfigServiceStub
    running: RunningServer
    artifact_dir: Path
    offline_url: str


@pytest.fixture
async def stack(tmp_path: Path, api_keys: ApiKeys) -> AsyncIterator[Stack]:
    offline_url = f"sqlite:///{tmp_path / 'ingest.db'}"
    engine = offline_store(offline_url)
    load_table(engine, "take_up", take_up_rows(600), tmp_path)
    load_table(engine, "one_class", [{**row, "label": 0} for row in take_up_rows(40)], tmp_path)
    engine.dispose()
    config_settings = SERVICES_UNDER_TEST["config"].settings(tmp_path, api_keys, None)
    config_running = await build_config(config_settings)
    artifact_dir = tmp_path / "artifacts"
    trainer_settings = SERVICES_UNDER_TEST["trainer"].settings(
        tmp_path,
        api_keys,
        None,
        offline_store_url=offline_url,
        config_target=target(config_running),
        config_api_key=api_keys.admin,
        artifact_dir=artifact_dir,
        max_concurrent_jobs=2,
    )
    running = await build_trainer(trainer_settings)
    channels: list[aio.Channel] = []
    try:
        trainer_channel = open_channel(target(running), api_key=api_keys.admin, deadline_seconds=30)
        config_channel = open_channel(target(config_running), api_key=api_keys.admin)
        channels += [trainer_channel, config_channel]
        yield Stack(
            trainer_pb2_grpc.TrainerServiceStub(trainer_channel),
            config_pb2_grpc.ConfigServiceStub(config_channel),
            running,
            artifact_dir,
            offline_url,
        )
    finally:
        for channel in channels:
            await channel.close()
        await running.stop()
        await config_running.stop()


async def watch(stack: Stack, job_id: str) -> list[trainer_pb2.JobEvent]:
    events = []
    async for event in stack.trainer.WatchJob(trainer_pb2.WatchJobRequest(job_id=job_id, from_start=True)):
        events.append(event)
    return events


async def train(stack: Stack, spec: trainer_pb2.TrainingSpec) -> list[trainer_pb2.JobEvent]:
    started = await stack.trainer.StartTraining(trainer_pb2.StartTrainingRequest(spec=spec))
    assert started.state == trainer_pb2.JOB_STATE_QUEUED
    return await watch(stack, started.job_id)


async def test_jobs_stream_their_epochs_register_versions_and_one_is_promoted(stack: Stack) -> None:
    # Two jobs at once (the trainer runs two workers): an MLP with the offer, and a logistic
    # regression without it; versions are numbered in the order the jobs finish.
    mlp_events, lr_events = await asyncio.gather(
        train(stack, training_spec()),
        train(
            stack, training_spec(model_type=trainer_pb2.MODEL_TYPE_LOGISTIC_REGRESSION, features=FEATURES[:3])
        ),
    )
    states = [event.state for event in mlp_events]
    assert states[0] == trainer_pb2.JOB_STATE_QUEUED
    assert trainer_pb2.JOB_STATE_RUNNING in states
    assert states[-1] == trainer_pb2.JOB_STATE_SUCCEEDED, mlp_events[-1].message
    assert lr_events[-1].state == trainer_pb2.JOB_STATE_SUCCEEDED, lr_events[-1].message
    epochs = [event for event in mlp_events if event.epoch and event.state == trainer_pb2.JOB_STATE_RUNNING]
    assert [event.epoch for event in epochs] == [1, 2, 3, 4]
    for event in epochs:
        assert event.max_epochs == 4
        assert event.loss > 0
        assert event.validation_loss > 0
        assert set(event.metrics) >= {"auc", "log_loss", "calibration_error"}
        assert event.eta_seconds >= 0
        assert event.progress.unit == "epochs"
        assert event.progress.done == event.epoch
    assert epochs[-1].eta_seconds == 0
    mlp, lr = mlp_events[-1].model.version, lr_events[-1].model.version
    assert mlp_events[-1].model.name == "take-up"
    assert {mlp, lr} == {1, 2}

    got = await stack.trainer.GetModel(trainer_pb2.GetModelRequest(name="take-up", version=mlp))
    version = got.model
    assert list(got.versions) == [1, 2]
    assert version.version == mlp
    assert version.model_type == trainer_pb2.MODEL_TYPE_MLP
    assert version.label == "label"
    assert version.training_set == "take_up"
    assert 0.5 < version.metrics.auc <= 1
    assert 0 < version.metrics.log_loss < 1
    assert 0 <= version.metrics.calibration_error < 0.5
    assert version.metrics.rows == 120
    assert [(f.name, f.encoding) for f in version.features] == [
        ("age", "standardize"),
        ("tenure_months", "standardize"),
        ("region", "one_hot"),
        ("offer_id", "offer"),
    ]
    # The input columns an OIP client sends, in order: numbers, then a 0/1 per category.
    assert version.input_columns[:3] == ["age", "tenure_months", "region=east"]
    assert {"region=north", "region=south", "offer_id=data_1gb"} <= set(version.input_columns)
    assert len(version.data_fingerprint) == 64
    assert len(version.checksum) == 64
    assert version.code_version.startswith("0.1.0")
    artifact = stack.artifact_dir / "take-up" / str(mlp)
    assert version.artifact_uri == artifact.resolve().as_uri()
    assert version.training_rows == 360
    assert version.hyperparameters["hidden_sizes"].list_value.values[0].number_value == 8
    assert sorted(p.name for p in artifact.iterdir()) == [
        "manifest.json",
        "model.pt",
        "preprocessing.json",
        "reference.json",
    ]
    assert not any((stack.artifact_dir / ".staging").glob("*"))
    newest = await stack.trainer.GetModel(trainer_pb2.GetModelRequest(name="take-up"))
    assert newest.model.version == 2

    jobs = await stack.trainer.ListJobs(trainer_pb2.ListJobsRequest())
    assert [job.state for job in jobs.jobs] == [trainer_pb2.JOB_STATE_SUCCEEDED] * 2
    job = next(job for job in jobs.jobs if job.model.version == mlp)
    assert job.epochs_done == 4
    assert job.spec.features == FEATURES
    assert job.spec.max_epochs == 4
    assert job.author == "test-admin"
    assert job.started_at.seconds
    assert job.finished_at.seconds
    page = await stack.trainer.ListJobs(trainer_pb2.ListJobsRequest(page=common_pb2.PageRequest(page_size=1)))
    assert len(page.jobs) == 1
    assert page.page.total_size == 2
    rest = await stack.trainer.ListJobs(
        trainer_pb2.ListJobsRequest(
            page=common_pb2.PageRequest(page_size=1, page_token=page.page.next_page_token)
        )
    )
    assert [j.job_id for j in rest.jobs] != [j.job_id for j in page.jobs]
    assert rest.page.next_page_token == ""

    # The two versions side by side.
    compared = await stack.trainer.Compare(
        trainer_pb2.CompareRequest(name="take-up", version_a=mlp, version_b=lr)
    )
    assert compared.a.version == mlp
    assert compared.b.model_type == trainer_pb2.MODEL_TYPE_LOGISTIC_REGRESSION
    assert {d.metric for d in compared.deltas} == {"auc", "log_loss", "calibration_error", "brier_score"}
    for delta in compared.deltas:
        assert delta.delta == pytest.approx(delta.b - delta.a)
    assert list(compared.features_removed) == ["offer_id"]
    assert list(compared.features_added) == []
    assert compared.same_data is False  # the offer column is not read: other data
    models = await stack.trainer.ListModels(trainer_pb2.ListModelsRequest())
    assert [(m.name, m.latest_version, m.version_count) for m in models.models] == [("take-up", 2, 2)]

    # Promote the MLP into a deployment: a new config revision binds it.
    spec = {"name": "telco", "offers": [{"id": offer} for offer in OFFERS]}
    published = await stack.config.Publish(config_pb2.PublishRequest(spec_text=yaml.safe_dump(spec)))
    dry = await stack.trainer.Promote(
        trainer_pb2.PromoteRequest(model="take-up", version=mlp, deployment="telco", dry_run=True)
    )
    assert '"model"' in dry.diff
    head = await stack.config.Get(config_pb2.GetRequest(deployment=common_pb2.DeploymentRef(name="telco")))
    assert head.deployment.revision == published.revision  # a dry run publishes nothing
    promoted = await stack.trainer.Promote(
        trainer_pb2.PromoteRequest(model="take-up", version=mlp, deployment="telco", message="the MLP")
    )
    assert promoted.config_revision == published.revision + 1
    assert promoted.model.name == "take-up"
    assert promoted.model.version == mlp
    head = await stack.config.Get(config_pb2.GetRequest(deployment=common_pb2.DeploymentRef(name="telco")))
    assert json.loads(head.deployment.spec_json)["model"] == {"name": "take-up", "version": mlp}
    got = await stack.trainer.GetModel(trainer_pb2.GetModelRequest(name="take-up", version=mlp))
    assert list(got.model.deployments) == ["telco"]
    models = await stack.trainer.ListModels(trainer_pb2.ListModelsRequest())
    assert [(d.name, d.revision) for d in models.models[0].deployments] == [("telco", mlp)]
    code, details = await status_of(
        stack.trainer.Promote(trainer_pb2.PromoteRequest(model="take-up", version=9, deployment="telco"))
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert details.startswith("version: model 'take-up' has no version 9")

    # As Thompson sampling's prior: the algorithm stays, with the weight (20 unless given).
    prior = await stack.trainer.Promote(
        trainer_pb2.PromoteRequest(
            model="take-up", version=mlp, deployment="telco", use=trainer_pb2.MODEL_USE_PRIOR
        )
    )
    head = await stack.config.Get(config_pb2.GetRequest(deployment=common_pb2.DeploymentRef(name="telco")))
    assert head.deployment.revision == prior.config_revision
    algorithm = json.loads(head.deployment.spec_json)["algorithm"]
    assert (algorithm["approach"], algorithm["model_prior_weight"]) == ("thompson", 20.0)
    # As the scorer: the deployment ranks by the model from now on.
    scored = await stack.trainer.Promote(
        trainer_pb2.PromoteRequest(
            model="take-up", version=lr, deployment="telco", use=trainer_pb2.MODEL_USE_SCORE
        )
    )
    head = await stack.config.Get(config_pb2.GetRequest(deployment=common_pb2.DeploymentRef(name="telco")))
    assert head.deployment.revision == scored.config_revision
    document = json.loads(head.deployment.spec_json)
    assert document["algorithm"]["approach"] == "model"
    assert document["model"] == {"name": "take-up", "version": lr}
    # Bad uses are refused naming the field, and nothing is published.
    for request, code_wanted, prefix in [
        (
            trainer_pb2.PromoteRequest(
                model="take-up", version=lr, deployment="telco", use=trainer_pb2.MODEL_USE_PRIOR
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "use: deployment 'telco' uses the 'model' algorithm; a model prior needs 'thompson'",
        ),
        (
            trainer_pb2.PromoteRequest(model="take-up", version=lr, deployment="telco", prior_weight=5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "prior_weight: applies only when the model is used as the prior",
        ),
        (
            trainer_pb2.PromoteRequest(
                model="take-up",
                version=lr,
                deployment="telco",
                use=trainer_pb2.MODEL_USE_PRIOR,
                prior_weight=-1,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "prior_weight: must be a non-negative number",
        ),
        (
            trainer_pb2.PromoteRequest(model="take-up", version=lr, deployment="telco", use=7),  # type: ignore[arg-type]
            grpc.StatusCode.INVALID_ARGUMENT,
            "use: unknown model use 7",
        ),
    ]:
        code, details = await status_of(stack.trainer.Promote(request))
        assert code == code_wanted, details
        assert details.startswith(prefix), details
    head = await stack.config.Get(config_pb2.GetRequest(deployment=common_pb2.DeploymentRef(name="telco")))
    assert head.deployment.revision == scored.config_revision


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(aio.AioRpcError) as raised:
        await call
    return raised.value.code(), raised.value.details() or ""


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"label": "took_it"}, "spec.label", "no column 'took_it'"),
        ({"features": ["age", "region"]}, "spec.features[1].encoding", "give it encoding one_hot"),
        ({"features": ["age", "nope"]}, "spec.features[1].name", "no column 'nope'"),
        ({"training_set": "one_class"}, "spec.label", "one class"),
        ({"training_set": "SELECT * FROM take_up WHERE age > 1000"}, "spec.query", "empty"),
        ({"features": ["age", "region:embedding"]}, "spec.features[1]", "not an encoding"),
        ({"model_name": "Not A Name"}, "spec.model_name", "pattern"),
        ({"max_epochs": 0, "seed": -1}, "spec.seed", "greater than or equal"),
    ],
)
async def test_a_spec_the_data_cannot_satisfy_is_refused_before_any_work_naming_the_field(
    stack: Stack, overrides: dict[str, Any], field: str, words: str
) -> None:
    code, details = await status_of(
        stack.trainer.StartTraining(trainer_pb2.StartTrainingRequest(spec=training_spec(**overrides)))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"{field}: "), details
    assert words in details
    jobs = await stack.trainer.ListJobs(trainer_pb2.ListJobsRequest())
    assert list(jobs.jobs) == []


async def test_a_missing_table_is_not_found_and_a_dry_run_queues_nothing(stack: Stack) -> None:
    code, details = await status_of(
        stack.trainer.StartTraining(
            trainer_pb2.StartTrainingRequest(spec=training_spec(training_set="no_such_table"))
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert details == "spec.training_set: no table 'no_such_table' in the offline store"
    dry = await stack.trainer.StartTraining(
        trainer_pb2.StartTrainingRequest(spec=training_spec(), dry_run=True)
    )
    assert dry.job_id == ""
    assert list((await stack.trainer.ListJobs(trainer_pb2.ListJobsRequest())).jobs) == []


async def test_unknown_models_versions_and_jobs_are_not_found(stack: Stack) -> None:
    cases = [
        (stack.trainer.GetModel(trainer_pb2.GetModelRequest(name="nope")), "name: no model 'nope'"),
        (
            stack.trainer.Promote(trainer_pb2.PromoteRequest(model="nope", version=1, deployment="telco")),
            "model: no model 'nope'",
        ),
        (stack.trainer.CancelJob(trainer_pb2.CancelJobRequest(job_id="job-x")), "job_id: no training job"),
        (
            stack.trainer.WatchJob(trainer_pb2.WatchJobRequest(job_id="job-x")).read(),
            "job_id: no training job",
        ),
    ]
    for call, prefix in cases:
        code, details = await status_of(call)
        assert code == grpc.StatusCode.NOT_FOUND, details
        assert details.startswith(prefix), details


async def test_a_queued_job_can_be_cancelled_and_its_watchers_see_it_end(
    tmp_path: Path, api_keys: ApiKeys
) -> None:
    offline_url = f"sqlite:///{tmp_path / 'ingest.db'}"
    engine = offline_store(offline_url)
    load_table(engine, "take_up", take_up_rows(200), tmp_path)
    engine.dispose()
    settings = SERVICES_UNDER_TEST["trainer"].settings(
        tmp_path, api_keys, None, offline_store_url=offline_url, artifact_dir=tmp_path / "artifacts"
    )
    running = await build_trainer(settings)
    try:
        async with open_channel(target(running), api_key=api_keys.admin, deadline_seconds=30) as channel:
            trainer = trainer_pb2_grpc.TrainerServiceStub(channel)
            # Jobs run one at a time: the second waits in the queue while the first trains.
            first = await trainer.StartTraining(
                trainer_pb2.StartTrainingRequest(
                    spec=training_spec(max_epochs=200, early_stopping=trainer_pb2.EarlyStopping(patience=0))
                )
            )
            second = await trainer.StartTraining(trainer_pb2.StartTrainingRequest(spec=training_spec()))
            watcher = trainer.WatchJob(trainer_pb2.WatchJobRequest(job_id=second.job_id))
            assert (await watcher.read()).state == trainer_pb2.JOB_STATE_QUEUED
            cancelled = await trainer.CancelJob(
                trainer_pb2.CancelJobRequest(job_id=second.job_id, reason="not needed")
            )
            assert cancelled.state == trainer_pb2.JOB_STATE_CANCELLED
            last = await watcher.read()
            assert last.state == trainer_pb2.JOB_STATE_CANCELLED
            assert last.message == "not needed"
            assert await watcher.read() == aio.EOF

            # The running one: cancelling terminates its worker.
            stream = trainer.WatchJob(trainer_pb2.WatchJobRequest(job_id=first.job_id, from_start=True))
            async for event in stream:
                if event.epoch >= 1:
                    break
            stream.cancel()
            cancelled = await trainer.CancelJob(trainer_pb2.CancelJobRequest(job_id=first.job_id))
            assert cancelled.state == trainer_pb2.JOB_STATE_CANCELLED
            jobs = await trainer.ListJobs(trainer_pb2.ListJobsRequest(state=trainer_pb2.JOB_STATE_CANCELLED))
            assert {job.job_id for job in jobs.jobs} == {first.job_id, second.job_id}
            first_job = next(job for job in jobs.jobs if job.job_id == first.job_id)
            assert first_job.error == "cancelled by request"
            assert 1 <= first_job.epochs_done < 200
            assert list((tmp_path / "artifacts").glob("take-up/*")) == []
    finally:
        await running.stop()
