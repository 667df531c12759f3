"""Train, register, promote and serve a model on the whole local stack, through Envoy.

`liveloop ingest` loads a take-up table, `liveloop train` trains it in a trainer worker process with
a progress bar, `liveloop promote` binds the version into a deployment, both predictor replicas
load it, and Invoke and the Open Inference Protocol (tritonclient) answer with its predictions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml

from libs.common.client import open_blocking_channel
from libs.protos.inference import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from libs.protos.liveloop.common.v1 import common_pb2
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from libs.stack.credentials import ensure_credentials
from libs.stack.processes import wait_until
from tests.e2e.conftest import LocalStack
from tests.e2e.test_predictor_rest import post
from tests.trainer_datasets import OFFERS, take_up_rows, write_csv

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

SPEC = {
    "model_name": "take-up",
    "training_set": "take_up",
    "label": "label",
    "features": [
        "age",
        "tenure_months",
        {"name": "region", "encoding": "one_hot"},
        {"name": "offer_id", "encoding": "offer"},
    ],
    "hyperparameters": {"epochs": 4, "learning_rate": 0.05, "batch_size": 128, "hidden_sizes": [8]},
    "split": {"time_column": "event_time"},
    "seed": 1,
}


@pytest.fixture
def model_stack(stack_config: LocalStack) -> LocalStack:
    """The stack's trainer reads ingest's offline store and publishes with the admin key."""
    credentials = ensure_credentials(stack_config.state_dir)  # the keys `liveloop up` will use
    stack_config.env["LIVELOOP_TRAINER_OFFLINE_STORE_URL"] = (
        f"sqlite:///{stack_config.state_dir.resolve() / 'data' / 'ingest.db'}"
    )
    stack_config.env["LIVELOOP_TRAINER_CONFIG_API_KEY"] = credentials.admin_key
    return stack_config


def test_train_promote_and_serve_through_the_front_door(model_stack: LocalStack, tmp_path: Path) -> None:
    stack = model_stack
    up = stack.cli("up", "--json")
    try:
        assert up.returncode == 0, f"liveloop up failed:\n{up.stdout}\n{up.stderr}"
        run(stack, tmp_path)
    finally:
        stack.cli("down")


def run(stack: LocalStack, tmp_path: Path) -> None:
    data = write_csv(tmp_path / "take_up.csv", take_up_rows(600))
    loaded = stack.cli("ingest", str(data), "--table", "take_up", "--event-time", "event_time", "--json")
    assert loaded.returncode == 0, loaded.stderr

    spec_file = tmp_path / "take-up.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    trained = stack.cli("train", str(spec_file), "--json", timeout=180)
    assert trained.returncode == 0, trained.stderr
    final = json.loads(trained.stdout)
    assert final["state"] == "JOB_STATE_SUCCEEDED"
    assert final["model"] == {"name": "take-up", "version": "1"}

    credentials = stack.credentials()
    with open_blocking_channel(
        stack.front_door, api_key=credentials["admin"], deadline_seconds=10
    ) as channel:
        config = config_pb2_grpc.ConfigServiceStub(channel)
        document: dict[str, object] = {
            "name": "telco",
            "offers": [{"id": offer} for offer in OFFERS],
            "exploration_epsilon": 0.0,
        }
        config.Publish(config_pb2.PublishRequest(spec_text=json.dumps(document)))
        # A deployment that cannot supply the model's inputs (no context variable, no feature view):
        # promoting the model into it would score every customer with training means, so both
        # replicas NACK the revision and keep serving the one before.
        promoted = stack.cli("promote", "take-up", "1", "--deployment", "telco", "--use", "score", "--json")
        assert promoted.returncode == 0, promoted.stderr
        skewed = int(json.loads(promoted.stdout)["config_revision"])

        def both_nacked() -> bool:
            replicas = config.ReplicaStatus(config_pb2.ReplicaStatusRequest()).replicas
            return len(replicas) == 2 and all(r.last_nack_revision == skewed for r in replicas)

        assert wait_until(both_nacked, timeout=30), "the replicas served a model they cannot feed"
        for replica in config.ReplicaStatus(config_pb2.ReplicaStatusRequest()).replicas:
            assert "reads age, tenure_months, region, which this deployment cannot supply" in (
                replica.last_nack_reason
            )
        # Declared as context variables (sent as params), the inputs reach the model.
        document["context_variables"] = [
            {"name": "age", "source": "param", "kind": "numeric", "default": 40},
            {"name": "tenure_months", "source": "param", "kind": "numeric", "default": 12},
            {"name": "region", "source": "param", "default": "east", "segment": False},
        ]
        config.Publish(config_pb2.PublishRequest(spec_text=json.dumps(document)))
        # Score with the model: the deployment's algorithm becomes `model`.
        promoted = stack.cli("promote", "take-up", "1", "--deployment", "telco", "--use", "score", "--json")
        assert promoted.returncode == 0, promoted.stderr
        revision = int(json.loads(promoted.stdout)["config_revision"])
        head = config.Get(config_pb2.GetRequest(deployment=common_pb2.DeploymentRef(name="telco")))
        spec = json.loads(head.deployment.spec_json)
        assert spec["model"] == {"name": "take-up", "version": 1}
        assert spec["algorithm"] == {"approach": "model"}
        assert head.deployment.revision == revision

    with open_blocking_channel(
        stack.front_door, api_key=credentials["invoke"], deadline_seconds=10
    ) as channel:
        predictor = predictor_pb2_grpc.PredictorServiceStub(channel)

        def both_replicas_serve_it() -> bool:
            replicas = {}
            for _ in range(10):
                reply = predictor.Ping(predictor_pb2.PingRequest())
                replicas[reply.replica_id] = reply.config_revision
            return len(replicas) == 2 and all(r >= revision for r in replicas.values())

        assert wait_until(both_replicas_serve_it, timeout=30), "the replicas did not apply the model revision"
        scores = []
        for _ in range(6):
            reply = predictor.Invoke(
                predictor_pb2.InvokeRequest(
                    campaign="telco",
                    customer="c1",
                    params=_params({"age": 30, "tenure_months": 24, "region": "south"}),
                )
            )
            assert reply.config_revision >= revision
            assert reply.model == "take-up:1"
            assert list(reply.warnings) == []  # every input supplied
            assert [row.result.propensity for row in reply.final_result][:1] == [1.0]
            scores.append(
                sorted((row.result.offer, round(row.result.arm_reward, 6)) for row in reply.final_result)
            )
        assert all(row == scores[0] for row in scores)  # both replicas, the same model, the same scores

    client = triton.InferenceServerClient(url=stack.front_door)
    try:
        headers = {"x-api-key": credentials["invoke"]}
        metadata = client.get_model_metadata("take-up", headers=headers, as_json=True, client_timeout=10)
        width = int(metadata["inputs"][0]["shape"][1])
        # The columns of that input, in order, for any client with liveloop's OIP proto.
        with open_blocking_channel(
            stack.front_door, api_key=credentials["invoke"], deadline_seconds=10
        ) as oip_channel:
            described = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(oip_channel).ModelMetadata(
                grpc_predict_v2_pb2.ModelMetadataRequest(name="take-up", version="1")
            )
        columns = json.loads(described.inputs[0].parameters["columns"].string_param)
        assert len(columns) == width
        assert columns[:2] == ["age", "tenure_months"]
        assert "region=north" in columns
        assert described.inputs[0].parameters["offer_feature"].string_param == "offer_id"
        tensor = triton.InferInput("features", [3, width], "FP32")
        tensor.set_data_from_numpy(np.zeros((3, width), dtype=np.float32))
        started = time.monotonic()
        result = client.infer("take-up", [tensor], model_version="1", headers=headers, client_timeout=10)
        assert time.monotonic() - started < 10
        probabilities = result.as_numpy("probability")
        assert probabilities.shape == (3, 1)
        assert ((probabilities > 0) & (probabilities < 1)).all()
    finally:
        client.close()

    shown = stack.cli("models", "--describe", "take-up:1", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["model"]["input_columns"] == columns
    table = stack.cli("models", "--describe", "take-up")
    assert table.returncode == 0, table.stderr
    assert f"{width}, in order: age, tenure_months" in table.stdout.replace("\n", " ")

    listed = stack.cli("models", "--json")
    assert listed.returncode == 0, listed.stderr
    models = json.loads(listed.stdout)["models"]
    assert models[0]["name"] == "take-up"
    assert models[0]["deployments"] == [{"name": "telco", "revision": "1"}]
    select_model_per_region(stack, spec_file, document)


def select_model_per_region(stack: LocalStack, spec_file: Path, document: dict[str, object]) -> None:
    """The model selector activator: a second version trained, bound for region north only; each
    request is scored (and logged) with the model its region selects, over gRPC and REST."""
    spec_file.write_text(yaml.safe_dump({**SPEC, "seed": 2}))
    trained = stack.cli("train", str(spec_file), "--json", timeout=180)
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout)["model"] == {"name": "take-up", "version": "2"}
    credentials = stack.credentials()
    selecting = {
        **document,
        "algorithm": {"approach": "model"},
        "model": {"name": "take-up", "version": 1},
        "model_selector": {"variable": "region", "models": {"north": {"name": "take-up", "version": 2}}},
    }
    with open_blocking_channel(
        stack.front_door, api_key=credentials["admin"], deadline_seconds=10
    ) as channel:
        config = config_pb2_grpc.ConfigServiceStub(channel)
        revision = config.Publish(config_pb2.PublishRequest(spec_text=json.dumps(selecting))).revision

        def both_applied() -> bool:
            replicas = config.ReplicaStatus(config_pb2.ReplicaStatusRequest()).replicas
            return len(replicas) == 2 and all(r.applied_revision >= revision for r in replicas)

        assert wait_until(both_applied, timeout=30), "the replicas did not apply the selector"
    with open_blocking_channel(
        stack.front_door, api_key=credentials["invoke"], deadline_seconds=10
    ) as channel:
        predictor = predictor_pb2_grpc.PredictorServiceStub(channel)
        for region, model in (("north", "take-up:2"), ("south", "take-up:1"), ("north", "take-up:2")):
            params = _params({"age": 30, "tenure_months": 24, "region": region})
            reply = predictor.Invoke(
                predictor_pb2.InvokeRequest(campaign="telco", customer="c1", params=params)
            )
            assert reply.model == model
    for region, model in (("north", "take-up:2"), ("east", "take-up:1")):
        payload = {"campaign": "telco", "customer": "c2", "params": json.dumps({"age": 50, "region": region})}
        status, body = post(stack, "/invocations", payload)
        assert status == 200, body
        assert body["model"] == model


def _params(values: dict[str, object]) -> object:
    from google.protobuf import json_format, struct_pb2

    return json_format.ParseDict(values, struct_pb2.Value())
