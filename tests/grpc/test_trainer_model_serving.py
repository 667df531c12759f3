"""A trained model served by a predictor replica: the `model` algorithm in Invoke, the Open Inference
Protocol (spoken by tritonclient), atomic swaps between versions, and NACKs for bad artifacts.

Artifacts are trained in this process (the same code a training worker runs) and written where the
replica looks for them; the replica follows a real config service.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc import aio
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from tritonclient.utils import InferenceServerException

from libs.common import redis_keys
from libs.common.client import open_channel
from libs.common.server import RunningServer
from libs.policy.models import load_model
from libs.protos.inference import grpc_predict_v2_pb2 as oip
from libs.protos.inference import grpc_predict_v2_pb2_grpc
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from services.config.server import build_server as build_config
from services.predictor.server import build_server as build_predictor
from tests.conftest import ApiKeys
from tests.grpc.conftest import PREDICTOR_REPLICA_ID, SERVICES_UNDER_TEST, target
from tests.polling import eventually
from tests.trainer_datasets import OFFERS, TrainedArtifact, take_up_spec, train_artifact

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
EPSILON = 0.2
CUSTOMER_FEATURES = {"age": "27", "tenure_months": "80", "region": "north"}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainedArtifact, TrainedArtifact]:
    """Versions 1 and 2 of take-up (different seeds and architectures), trained once for the module."""
    scratch = tmp_path_factory.mktemp("models")
    root = scratch / "artifacts"
    one = train_artifact(scratch, root, take_up_spec(), version=1)
    two = train_artifact(
        scratch, root, take_up_spec(seed=9, model_type="logistic_regression"), version=2, rows=300
    )
    return root, one, two


@dataclass
class Serving:
    config: config_pb2_grpc.ConfigServiceStub
    predictor: predictor_pb2_grpc.PredictorServiceStub
    inference: grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub
    triton: triton.InferenceServerClient
    invoke_key: str
    model_dir: Path

    async def publish(self, version: int, **overrides: Any) -> int:
        document = {
            "name": "telco",
            "offers": [{"id": offer} for offer in OFFERS],
            "algorithm": {"approach": "model"},
            "model": {"name": "take-up", "version": version},
            "exploration_epsilon": EPSILON,
            "default_number_of_offers": 3,
            "feature_lookup": {"feature_view": "customers", "key": "customer"},
            **overrides,
        }
        reply = await self.config.Publish(config_pb2.PublishRequest(spec_text=json.dumps(document)))
        return int(reply.revision)

    def nacked(self, revision: int) -> Callable[[], Awaitable[config_pb2.ReplicaState | None]]:
        """A probe: the replica's state once it has NACKed `revision`."""

        async def probe() -> config_pb2.ReplicaState | None:
            status = await self.config.ReplicaStatus(
                config_pb2.ReplicaStatusRequest(replica_id=PREDICTOR_REPLICA_ID)
            )
            state = status.replicas[0] if status.replicas else None
            return state if state is not None and state.last_nack_revision == revision else None

        return probe

    async def revision(self) -> int:
        return int((await self.predictor.Ping(predictor_pb2.PingRequest())).config_revision)

    async def invoke(self, customer: str = "c1") -> predictor_pb2.InvokeResponse:
        return await self.predictor.Invoke(predictor_pb2.InvokeRequest(campaign="telco", customer=customer))

    async def tri(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(
            call, *args, headers={"x-api-key": self.invoke_key}, client_timeout=10, **kwargs
        )


@pytest.fixture
async def serving(
    tmp_path: Path,
    api_keys: ApiKeys,
    redis_url: str,
    artifacts: tuple[Path, TrainedArtifact, TrainedArtifact],
) -> AsyncIterator[Serving]:
    root = artifacts[0]
    model_dir = tmp_path / "artifacts"
    shutil.copytree(root, model_dir)
    config = await build_config(
        SERVICES_UNDER_TEST["config"].settings(
            tmp_path, api_keys, None, heartbeat_seconds=0.2, poll_seconds=0.2
        )
    )
    predictor_settings = SERVICES_UNDER_TEST["predictor"].settings(
        tmp_path,
        api_keys,
        redis_url,
        config_target=target(config),
        config_api_key=api_keys.service,
        model_dir=model_dir,
    )
    predictor: RunningServer | None = None
    channels: list[aio.Channel] = []
    redis = Redis.from_url(redis_url)
    client = None
    try:
        predictor = await build_predictor(predictor_settings)
        await redis.hset(redis_keys.online_features("customers", "c1"), mapping=CUSTOMER_FEATURES)
        # What ingest writes when it materializes the view: the features it holds.
        await redis.set(redis_keys.feature_view_columns("customers"), json.dumps(list(CUSTOMER_FEATURES)))
        config_channel = open_channel(target(config), api_key=api_keys.admin)
        predictor_channel = open_channel(target(predictor), api_key=api_keys.invoke)
        channels += [config_channel, predictor_channel]
        client = triton.InferenceServerClient(url=target(predictor))
        yield Serving(
            config_pb2_grpc.ConfigServiceStub(config_channel),
            predictor_pb2_grpc.PredictorServiceStub(predictor_channel),
            grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(predictor_channel),
            client,
            api_keys.invoke,
            model_dir,
        )
    finally:
        if client is not None:
            client.close()
        for channel in channels:
            await channel.close()
        if predictor is not None:
            await predictor.stop()
        await config.stop()
        await redis.delete(redis_keys.online_features("customers", "c1"))
        await redis.aclose()


def predictions(directory: Path) -> dict[str, float]:
    model = load_model(directory, "take-up", int(directory.name))
    return dict(zip(OFFERS, model.predict_offers(CUSTOMER_FEATURES, list(OFFERS)).tolist(), strict=True))


async def test_invoke_ranks_offers_by_the_models_take_up_with_honest_propensities(
    serving: Serving, artifacts: tuple[Path, TrainedArtifact, TrainedArtifact]
) -> None:
    revision = await serving.publish(1)
    await eventually(lambda: _at_least(serving, revision), what="the replica on the revision binding v1")
    expected = predictions(serving.model_dir / "take-up" / "1")
    best = max(expected, key=lambda offer: expected[offer])
    explored = exploited = 0
    for _ in range(40):
        reply = await serving.invoke()
        assert reply.config_revision == revision
        assert list(reply.warnings) == []
        assert reply.model == "take-up:1"
        rows = [row.result for row in reply.final_result]
        assert sorted(row.offer for row in rows) == sorted(OFFERS)
        for row in rows:
            assert abs(row.arm_reward - expected[row.offer]) <= 1e-6
            assert abs(row.model_score - expected[row.offer]) <= 1e-6
            assert abs(row.score - expected[row.offer]) <= 1e-6
            assert 0 < row.propensity <= 1
        # Rank 1: P(first) = (1 - eps) + eps / 3 for the model's best, eps / 3 for the others.
        top = (1 - EPSILON) + EPSILON / 3
        assert rows[0].propensity == pytest.approx(top if rows[0].offer == best else EPSILON / 3)
        if reply.explore:
            explored += 1
        else:
            exploited += 1
            assert [row.offer for row in rows] == sorted(OFFERS, key=lambda o: -expected[o])
            # Rank 2 given rank 1: the exploiting branch is sure of it, exploring picks 1 of 2.
            second = (EPSILON / 3 / 2 + (1 - EPSILON)) / (EPSILON / 3 + (1 - EPSILON))
            assert [row.propensity for row in rows] == pytest.approx([top, second, 1.0])
    assert exploited > 0


async def test_a_model_input_the_request_cannot_supply_is_reported_and_counted(
    serving: Serving, redis_url: str
) -> None:
    """Train/serve skew is never silent: the reply names the input scored with the training mean."""
    revision = await serving.publish(1)
    await eventually(lambda: _at_least(serving, revision), what="the replica on the revision binding v1")
    redis = Redis.from_url(redis_url)
    try:
        await redis.hset(
            redis_keys.online_features("customers", "c2"), mapping={"age": "27", "region": "north"}
        )
    finally:
        await redis.aclose()

    def counted() -> float:
        labels = {"deployment": "telco", "model": "take-up:1", "input": "tenure_months"}
        return REGISTRY.get_sample_value("liveloop_predictor_model_input_defaults_total", labels) or 0.0

    before = counted()
    reply = await serving.invoke("c2")
    assert [w for w in reply.warnings if "tenure_months" in w] == [
        "model take-up:1 has no value for tenure_months: scored with the training mean (numbers) or no "
        "category instead"
    ]
    assert counted() == before + 1
    assert list((await serving.invoke("c1")).warnings) == []  # every input there: nothing to say


async def test_a_model_whose_inputs_the_deployment_cannot_supply_is_nacked(
    serving: Serving, redis_url: str
) -> None:
    """Silent train/serve skew refused: the view lost a feature the model reads, so the next
    revision binding it is NACKed naming the input, and the one before keeps serving."""
    good = await serving.publish(1)
    await eventually(lambda: _at_least(serving, good), what="the replica on the revision binding v1")
    redis = Redis.from_url(redis_url)
    key = redis_keys.feature_view_columns("customers")
    try:
        await redis.set(key, json.dumps(["age", "region"]))  # re-materialized without tenure_months
        bad = await serving.publish(1, exploration_epsilon=0.1)

        state = await eventually(serving.nacked(bad), what="the NACK of the revision the view cannot feed")
        assert (
            "model take-up:1 reads tenure_months, which this deployment cannot supply"
            in state.last_nack_reason
        )
        assert "feature view 'customers' holds age, region" in state.last_nack_reason
        assert await serving.revision() == good
        # A declared context variable (or a lookup default) supplies it: served again.
        fixed = await serving.publish(
            1, feature_lookup={"feature_view": "customers", "defaults": {"tenure_months": 0}}
        )
        await eventually(lambda: _at_least(serving, fixed), what="the revision that supplies tenure_months")
    finally:
        await redis.set(key, json.dumps(list(CUSTOMER_FEATURES)))
        await redis.aclose()


async def test_a_bound_model_does_not_change_what_another_algorithm_scores(
    serving: Serving, redis_url: str
) -> None:
    """Naive Bayes reads the context only: binding a model (reported per offer) must not add the
    customer's raw features to what it scores with."""
    naive_bayes = {"approach": "naive_bayes"}
    revision = await serving.publish(1, algorithm=naive_bayes)
    await eventually(lambda: _at_least(serving, revision), what="the replica on the naive Bayes revision")
    for _ in range(3):  # counts for the shown offers, none for raw feature values
        await serving.invoke()
    redis = Redis.from_url(redis_url)
    key = redis_keys.naive_bayes_counts("telco", "0")
    try:
        counts = await redis.hgetall(key)
        assert counts
        bound = await serving.invoke()
        await redis.delete(key)
        await redis.hset(key, mapping=counts)  # the same counts for the unbound revision
        revision = await serving.publish(1, algorithm=naive_bayes, model=None)
        await eventually(lambda: _at_least(serving, revision), what="the replica on the unbound revision")
        plain = await serving.invoke()
    finally:
        await redis.aclose()
    assert (bound.model, plain.model) == ("take-up:1", "")
    expected = predictions(serving.model_dir / "take-up" / "1")
    assert all(abs(row.result.model_score - expected[row.result.offer]) <= 1e-6 for row in bound.final_result)
    rewards = {row.result.offer: row.result.arm_reward for row in plain.final_result}
    assert {row.result.offer: row.result.arm_reward for row in bound.final_result} == pytest.approx(rewards)


async def test_thompson_reports_the_bound_model_and_can_start_from_it(
    serving: Serving, artifacts: tuple[Path, TrainedArtifact, TrainedArtifact]
) -> None:
    expected = predictions(serving.model_dir / "take-up" / "1")
    # Bound but not scored with: Thompson sampling as usual, the model's take-up reported per offer.
    revision = await serving.publish(1, algorithm={"approach": "thompson"})
    await eventually(lambda: _at_least(serving, revision), what="the replica on the plain thompson revision")
    reply = await serving.invoke()
    assert reply.model == "take-up:1"
    for row in (row.result for row in reply.final_result):
        assert abs(row.model_score - expected[row.offer]) <= 1e-6
        # Beta(1, 1) and the impressions so far (no response): the model is not its prior
        assert row.arm_reward == pytest.approx(1 / (2 + row.arm_count), abs=1e-6)
    # As the prior: every arm starts with 50 pseudo-observations at the model's take-up.
    weight = 50.0
    revision = await serving.publish(1, algorithm={"approach": "thompson", "model_prior_weight": weight})
    await eventually(lambda: _at_least(serving, revision), what="the replica on the model-prior revision")
    reply = await serving.invoke(customer="c-no-history")
    for row in (row.result for row in reply.final_result):
        assert abs(row.model_score - predictions_for(serving, {})[row.offer]) <= 1e-6
        prior_mean = (1 + weight * row.model_score) / (2 + weight + row.arm_count)
        assert row.arm_reward == pytest.approx(prior_mean, abs=1e-6)


def predictions_for(serving: Serving, features: dict[str, str]) -> dict[str, float]:
    model = load_model(serving.model_dir / "take-up" / "1", "take-up", 1)
    return dict(zip(OFFERS, model.predict_offers(features, list(OFFERS)).tolist(), strict=True))


async def _at_least(serving: Serving, revision: int) -> bool:
    return await serving.revision() >= revision


async def test_the_open_inference_protocol_serves_the_loaded_version(
    serving: Serving, artifacts: tuple[Path, TrainedArtifact, TrainedArtifact]
) -> None:
    revision = await serving.publish(1)
    await eventually(lambda: _at_least(serving, revision), what="v1 applied")
    one = artifacts[1]
    client = serving.triton
    assert await serving.tri(client.is_model_ready, "take-up") is True
    assert await serving.tri(client.is_model_ready, "take-up", "1") is True
    metadata = await serving.tri(client.get_model_metadata, "take-up", as_json=True)
    width = one.outcome.preprocessing.width
    assert metadata["name"] == "take-up"
    assert metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [str(-1), str(width)]}]
    assert metadata["outputs"] == [{"name": "probability", "datatype": "FP32", "shape": ["-1", "1"]}]

    # tritonclient sends raw_input_contents: the encoded rows of two customers.
    rows = np.arange(one.data.rows)[:2]
    matrix = one.outcome.preprocessing.encode({k: v[rows] for k, v in one.data.columns.items()})
    tensor = triton.InferInput("features", list(matrix.shape), "FP32")
    tensor.set_data_from_numpy(matrix)
    result = await serving.tri(
        client.infer,
        "take-up",
        [tensor],
        model_version="1",
        outputs=[triton.InferRequestedOutput("probability")],
    )
    served = result.as_numpy("probability")
    assert served.shape == (2, 1)
    assert served.dtype == np.float32
    from services.trainer.core.training import predict

    assert np.allclose(served[:, 0], predict(one.outcome.model, matrix), rtol=0, atol=1e-6)

    # Typed contents, as other OIP clients send them: the answer is typed too.
    typed = await serving.inference.ModelInfer(
        oip.ModelInferRequest(
            model_name="take-up",
            inputs=[
                oip.ModelInferRequest.InferInputTensor(
                    name="features",
                    datatype="FP32",
                    shape=list(matrix.shape),
                    contents=oip.InferTensorContents(fp32_contents=matrix.reshape(-1).tolist()),
                )
            ],
        )
    )
    assert typed.model_version == "1"
    assert list(typed.outputs[0].shape) == [2, 1]
    assert np.allclose(typed.outputs[0].contents.fp32_contents, served[:, 0], rtol=0, atol=1e-7)

    async def refused(**changes: Any) -> InferenceServerException:
        bad = triton.InferInput(
            "features", changes.get("shape", list(matrix.shape)), changes.get("dtype", "FP32")
        )
        bad.set_data_from_numpy(changes.get("data", matrix))
        with pytest.raises(InferenceServerException) as raised:
            await serving.tri(
                client.infer, changes.get("model", "take-up"), [bad], model_version=changes.get("version", "")
            )
        return raised.value

    wrong_width = np.zeros((2, width + 1), dtype=np.float32)
    error = await refused(shape=[2, width + 1], data=wrong_width)
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert (
        error.message() == f"inputs[0].shape: must be [batch, {width}] with batch >= 1, got [2, {width + 1}]"
    )
    error = await refused(dtype="FP64", data=matrix.astype(np.float64))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert error.message().startswith("inputs[0].datatype")
    error = await refused(version="7")
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "version '7'" in error.message()
    error = await refused(model="churn")
    assert error.status() == "StatusCode.NOT_FOUND"
    assert error.message() == f"model_name: model 'churn' is not loaded on replica {PREDICTOR_REPLICA_ID}"


async def test_a_new_version_swaps_in_and_a_tampered_one_is_nacked_while_the_old_keeps_serving(
    serving: Serving, artifacts: tuple[Path, TrainedArtifact, TrainedArtifact]
) -> None:
    first = await serving.publish(1)
    await eventually(lambda: _at_least(serving, first), what="v1 applied")
    second = await serving.publish(2)
    await eventually(lambda: _at_least(serving, second), what="v2 applied")
    expected_two = predictions(serving.model_dir / "take-up" / "2")
    reply = await serving.invoke()
    assert {row.result.offer: row.result.arm_reward for row in reply.final_result} == pytest.approx(
        expected_two, abs=1e-6
    )
    metadata = await serving.tri(serving.triton.get_model_metadata, "take-up", as_json=True)
    assert metadata["versions"] == ["2"]  # version 1 is no longer bound, so no longer served

    # Version 3: version 2's files with its model changed after training.
    three = serving.model_dir / "take-up" / "3"
    shutil.copytree(serving.model_dir / "take-up" / "2", three)
    manifest = json.loads((three / "manifest.json").read_text())
    manifest["version"] = 3
    (three / "manifest.json").write_text(json.dumps(manifest))
    model = bytearray((three / "model.pt").read_bytes())
    model[-100] ^= 0x01
    (three / "model.pt").write_bytes(bytes(model))
    bad = await serving.publish(3)

    state = await eventually(
        serving.nacked(bad), what="the NACK of the revision binding the tampered version"
    )
    assert "checksum mismatch for model.pt" in state.last_nack_reason
    assert state.applied_revision == second
    assert await serving.revision() == second
    reply = await serving.invoke()
    assert reply.config_revision == second
    assert {row.result.offer: row.result.arm_reward for row in reply.final_result} == pytest.approx(
        expected_two, abs=1e-6
    )
    assert await serving.tri(serving.triton.is_model_ready, "take-up", "2") is True
    with pytest.raises(aio.AioRpcError) as raised:
        await serving.inference.ModelReady(oip.ModelReadyRequest(name="take-up", version="3"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
