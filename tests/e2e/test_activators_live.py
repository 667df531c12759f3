"""Plugins and prediction activators on a whole local stack (two replicas behind real Envoy), each
through REST (the ecosystem.Ai payloads) and through gRPC at the front door: the example plugin
package's plugins at every stage (one reading a corpus published from a CSV beside the spec), a
whitelist that ingest loaded and materialized, a budget, a shadow compared by the monitor, and a
router whose responses reach the deployment that served."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf.struct_pb2 import Struct
from redis import Redis

from libs.common import decision_log, redis_keys
from libs.common.client import open_blocking_channel
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from libs.stack.processes import wait_until
from tests.e2e.conftest import LocalStack, local_stack, started
from tests.e2e.test_predictor_rest import REPLICAS, post
from tests.integration.test_predictor_decision import value

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

SPEC = """
name: activators
campaigns: [activators]
offers:
  - {id: gold-data, category: data, attributes: {tier: gold}}
  - {id: basic-data, category: data, attributes: {tier: basic}}
  - {id: roam-eu, category: roaming, attributes: {tier: gold}}
  - {id: tablet-deal, category: devices, budget: {limit: 3, period: day}}
context_variables:
  - {name: tier, source: param, default: basic}
algorithm: {approach: thompson}
default_number_of_offers: 4
corpora:
  catalog: {key: offer, file: catalog.csv}
  allowed: {key: customer, table: allowed}
whitelist: {feature_view: allowed, column: offers, when_missing: all}
plugins:
  - {name: hide_categories, stage: pre_score, params: {categories: [roaming], when_param: travelling}}
  - {name: loyalty_boost, stage: post_score, params: {boost: 3.0}}
  - {name: catalog_margin, stage: post_score, params: {corpus: catalog, column: margin}}
  - {name: amount_reward, stage: reward, params: {scale: 0.01, cap: 0.5}}
shadow: candidate
"""
# basic-data's margin is 0: catalog_margin always ranks it last.
CATALOG = "offer,margin\ngold-data,2.0\nbasic-data,0\nroam-eu,1.5\ntablet-deal,1.0\n"
CANDIDATE = {
    "name": "candidate",
    "campaigns": ["candidate-only"],
    "offers": [{"id": "gold-data"}, {"id": "basic-data"}, {"id": "roam-eu"}, {"id": "tablet-deal"}],
    "algorithm": {"approach": "epsilon_greedy"},
    "exploration_epsilon": 0.2,
}
ROUTER = {
    "name": "front",
    "campaigns": ["front"],
    "offers": [{"id": "activators"}, {"id": "candidate"}],
    "context_variables": [{"name": "tier", "source": "param", "default": "basic"}],
    "routing": {"by": "switch", "variable": "tier", "routes": {"gold": "activators"}, "default": "candidate"},
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with started(local_stack(tmp_path_factory.mktemp("activators") / "state")) as local:
        yield local


def ok(stack: LocalStack, *args: str) -> str:
    result = stack.cli(*args)
    assert result.returncode == 0, f"liveloop {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def applied_everywhere(stack: LocalStack, revision: int) -> None:
    with open_blocking_channel(
        stack.front_door, api_key=stack.credentials()["admin"], deadline_seconds=15
    ) as ch:
        config = config_pb2_grpc.ConfigServiceStub(ch)

        def both() -> bool:
            replicas = config.ReplicaStatus(config_pb2.ReplicaStatusRequest()).replicas
            return {
                r.replica_id for r in replicas if r.connected and r.applied_revision >= revision
            } >= REPLICAS

        assert wait_until(both, timeout=20), f"replicas did not apply revision {revision}"


def publish_file(stack: LocalStack, path: Path) -> int:
    reply = json.loads(ok(stack, "config", "publish", str(path), "--json", "--no-diff"))
    applied_everywhere(stack, int(reply["revision"]))
    return int(reply["revision"])


@pytest.fixture(scope="module")
def deployed(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whitelist table ingested and materialized, then the candidate, the deployment (its
    corpus read from the CSV beside it) and the router published."""
    folder = tmp_path_factory.mktemp("activators-files")
    (folder / "allowed.csv").write_text('customer,offers\nw1,"gold-data,tablet-deal"\nw2,basic-data\n')
    ok(stack, "ingest", str(folder / "allowed.csv"), "--table", "allowed", "--key", "customer", "--upload")
    ok(stack, "materialize", "allowed")
    (folder / "catalog.csv").write_text(CATALOG)
    (folder / "activators.yaml").write_text(SPEC)
    for name, document in (("candidate", CANDIDATE), ("front", ROUTER)):
        (folder / f"{name}.json").write_text(json.dumps(document))
    publish_file(stack, folder / "candidate.json")
    publish_file(stack, folder / "activators.yaml")
    publish_file(stack, folder / "front.json")
    assert wait_until(lambda: post(stack, "/invocations", invocation())[0] == 200, timeout=20)
    return folder


def invocation(customer: str = "anyone", **params: Any) -> dict[str, Any]:
    return {"campaign": "activators", "customer": customer, "channel": "app", "params": json.dumps(params)}


def rest_invoke(stack: LocalStack, payload: dict[str, Any]) -> dict[str, Any]:
    status, body = post(stack, "/invocations", payload)
    assert status == 200, body
    return dict(body)


def shown(reply: dict[str, Any]) -> list[str]:
    return [row["result"]["offer"] for row in reply["final_result"]]


def predictor(stack: LocalStack) -> Any:
    return open_blocking_channel(stack.front_door, api_key=stack.credentials()["invoke"], deadline_seconds=15)


def grpc_invoke(stub: Any, customer: str, **params: Any) -> predictor_pb2.InvokeResponse:
    request = predictor_pb2.InvokeRequest(campaign="activators", customer=customer, channel="app")
    request.params.CopyFrom(value(params))
    return stub.Invoke(request)


def test_plugins_whitelist_and_corpus_through_rest_and_grpc(stack: LocalStack, deployed: Path) -> None:
    # REST. The whitelisted customer sees only its offers (the list read from the materialized table).
    assert set(shown(rest_invoke(stack, invocation("w2")))) == {"basic-data"}
    # catalog_margin (post_score, reading the corpus the CLI published from catalog.csv): basic-data's
    # margin is 0, so it comes last; hide_categories (pre_score) drops roaming when travelling.
    for _ in range(5):
        reply = rest_invoke(stack, invocation())
        assert shown(reply)[-1] == "basic-data"
        assert "roam-eu" not in shown(rest_invoke(stack, invocation(travelling=True)))
    unlisted = rest_invoke(stack, invocation())
    assert "no whitelist for 'anyone' in 'allowed': every offer stays eligible" in unlisted["warnings"]

    # gRPC at the front door: the same deployment, the same activators.
    with predictor(stack) as channel:
        stub = predictor_pb2_grpc.PredictorServiceStub(channel)
        assert {r.result.offer for r in grpc_invoke(stub, "w2").final_result} == {"basic-data"}
        reply = grpc_invoke(stub, "someone", travelling=True)
        offers = [r.result.offer for r in reply.final_result]
        assert offers[-1] == "basic-data"
        assert "roam-eu" not in offers

    # The published spec carries the corpus rows and where they came from (a new CSV: a new revision).
    published = yaml.safe_load(ok(stack, "config", "get", "activators"))
    assert published["corpora"]["catalog"]["rows"][1] == {"offer": "basic-data", "margin": 0}
    assert published["corpora"]["catalog"]["source"].startswith("catalog.csv sha256:")
    # ... and the ingested table's rows, named by the write they come from.
    allowed = published["corpora"]["allowed"]
    assert allowed["rows"] == [
        {"customer": "w1", "offers": "gold-data,tablet-deal"},
        {"customer": "w2", "offers": "basic-data"},
    ]
    assert allowed["source"].startswith("table allowed fingerprint:")


def test_a_reward_plugin_turns_the_response_payload_into_the_reward_learned(
    stack: LocalStack, deployed: Path
) -> None:
    redis = Redis.from_url(stack.redis_url)
    try:
        # REST: the whole /response body is the payload; amount 20 x scale 0.01 = 0.2.
        contact = rest_invoke(stack, invocation("w1"))
        offer = shown(contact)[0]
        segment_key = redis_keys.arm_statistics("activators", "0", contact["segment"])
        before = float(redis.hget(segment_key, f"{offer}|s") or 0)
        status, body = post(
            stack, "/response", {"uuid": contact["uuid"], "offers_accepted": [offer], "amount": 20}
        )
        assert status == 200, body
        assert body["learned"], body
        assert float(redis.hget(segment_key, f"{offer}|s") or 0) == pytest.approx(before + 0.2)

        # gRPC: Respond's payload, capped at 0.5.
        with predictor(stack) as channel:
            stub = predictor_pb2_grpc.PredictorServiceStub(channel)
            reply = grpc_invoke(stub, "w1")
            first = reply.final_result[0].result.offer
            before = float(redis.hget(segment_key, f"{first}|s") or 0)
            payload = Struct()
            payload.update({"amount": 5000})
            request = predictor_pb2.RespondRequest(uuid=reply.uuid, payload=payload)
            request.offers_accepted.string_value = first
            assert stub.Respond(request).learned
            assert float(redis.hget(segment_key, f"{first}|s") or 0) == pytest.approx(before + 0.5)
        credited = [
            record.credited_reward
            for _, fields in redis.xrange(redis_keys.DECISION_STREAM)
            if isinstance(record := decision_log.decode_entry(fields), decision_log.Response)
            and record.uuid in (contact["uuid"], reply.uuid)
        ]
        assert sorted(credited) == [0.2, 0.5]
    finally:
        redis.close()


def test_a_budget_is_shared_by_both_replicas_through_rest_and_grpc(stack: LocalStack, deployed: Path) -> None:
    seen: Counter[str] = Counter()
    warned = False
    with predictor(stack) as channel:
        stub = predictor_pb2_grpc.PredictorServiceStub(channel)
        for i in range(12):
            if i % 2:
                reply = rest_invoke(stack, invocation("w1"))
                offers, warnings = shown(reply), reply["warnings"]
            else:
                grpc_reply = grpc_invoke(stub, "w1")
                offers, warnings = (
                    [r.result.offer for r in grpc_reply.final_result],
                    list(grpc_reply.warnings),
                )
            seen.update(offers)
            warned |= (
                "offer 'tablet-deal' left out: its budget (3 presentations per day) is used up" in warnings
            )
    assert warned  # w1 may see it on every request: the budget stops it
    # Over every request of the module (any test may have used the budget first): exactly 3 shown.
    redis = Redis.from_url(stack.redis_url)
    try:
        contacts = [
            record
            for _, fields in redis.xrange(redis_keys.DECISION_STREAM)
            if isinstance(record := decision_log.decode_entry(fields), decision_log.Contact)
            and record.deployment == "activators"
            and not record.is_shadow
        ]
    finally:
        redis.close()
    assert sum(row.offer == "tablet-deal" for record in contacts for row in record.shown) == 3
    assert seen["tablet-deal"] <= 3


def test_a_shadow_is_compared_and_a_router_sends_responses_to_the_deployment_that_served(
    stack: LocalStack, deployed: Path
) -> None:
    # The router: tier gold -> activators, anything else -> candidate (over REST and gRPC).
    gold = rest_invoke(stack, {"campaign": "front", "customer": "r1", "params": json.dumps({"tier": "gold"})})
    assert (gold["deployment"], gold["routed_by"]) == ("activators", "front")
    with predictor(stack) as channel:
        stub = predictor_pb2_grpc.PredictorServiceStub(channel)
        other = stub.Invoke(predictor_pb2.InvokeRequest(campaign="front", customer="r2"))
        assert (other.deployment, other.routed_by) == ("candidate", "front")
        request = predictor_pb2.RespondRequest(uuid=other.uuid)
        request.offers_accepted.string_value = other.final_result[0].result.offer
        answered = stub.Respond(request)
        assert answered.learned
        assert answered.deployment == "candidate"
    status, body = post(
        stack,
        "/response",
        {"uuid": gold["uuid"], "offers_accepted": [gold["final_result"][0]["result"]["offer"]]},
    )
    assert status == 200, body
    assert (body["learned"], body["deployment"]) == (True, "activators"), body

    # Every request to `activators` above also had the candidate's decision logged as its shadow;
    # the monitor compares them (CLI and REST).
    def compared() -> dict[str, Any] | None:
        result = stack.cli("monitor", "shadow", "activators", "--json")
        if result.returncode != 0:
            return None
        reply = json.loads(result.stdout)
        return reply if reply.get("shadows") and int(reply["shadows"][0]["compared"]) >= 10 else None

    assert wait_until(lambda: compared() is not None, timeout=30), "the monitor never compared the shadow"
    reply = compared()
    assert reply is not None
    (row,) = reply["shadows"]
    assert row["shadow"] == "candidate"
    assert 0 <= row["agreement"] <= 1
    # Each estimate is given, or refused with the reason (a shadow that rarely agrees with live, or
    # favours offers live almost never puts first, cannot be estimated from live's rewards).
    estimated = {e["estimator"].removeprefix("ESTIMATOR_").lower() for e in row["estimates"]}
    refused = {reason.split(":")[0] for reason in row.get("refused", [])}
    assert estimated | refused == {"ips", "snips"}, row
    status, rest = post(stack, "/v1/monitor/activators/shadow", None, key="admin", method="GET")
    assert status == 200, rest
    assert rest["shadows"][0]["shadow"] == "candidate", rest
    human = ok(stack, "monitor", "shadow", "activators")
    assert "candidate shadowing activators" in human
