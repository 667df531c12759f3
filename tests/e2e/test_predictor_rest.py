"""The predictor through the front door of a whole local stack (two replicas behind real Envoy):
the ecosystem.Ai REST payloads on /invocations, /response and /refresh through the gRPC-JSON
transcoder, errors as JSON with their gRPC code, and zero failed requests while the deployment is
published again and again under load."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from grpc import aio

from libs.common.client import open_blocking_channel, open_channel
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from libs.stack.processes import wait_until
from tests.e2e.conftest import REPO, LocalStack, stack_environment

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

EXAMPLE = REPO / "examples" / "deployments" / "telco-offers.yaml"
REPLICAS = {"predictor-1", "predictor-2"}
RESULT_FIELDS = {"offer", "offer_name", "score", "final_score", "arm_reward", "propensity", "rank", "context"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """One stack for the module (starting one takes a while)."""
    state_dir = tmp_path_factory.mktemp("predictor-rest") / "state"
    env, envoy_port, admin_port = stack_environment(state_dir)
    local = LocalStack(state_dir, env, envoy_port, admin_port)
    result = local.cli("up", "--json")
    try:
        assert result.returncode == 0, f"liveloop up failed:\n{result.stdout}\n{result.stderr}"
        yield local
    finally:
        local.cli("down")


def example_document() -> dict[str, Any]:
    return dict(yaml.safe_load(EXAMPLE.read_text()))


def publish(stack: LocalStack, document: dict[str, Any]) -> int:
    """Publish through the front door with the admin key; wait until both replicas applied it."""
    admin = stack.credentials()["admin"]
    with open_blocking_channel(stack.front_door, api_key=admin, deadline_seconds=15) as channel:
        config = config_pb2_grpc.ConfigServiceStub(channel)
        revision = int(config.Publish(config_pb2.PublishRequest(spec_text=json.dumps(document))).revision)

        def both_applied() -> bool:
            replicas = config.ReplicaStatus(config_pb2.ReplicaStatusRequest()).replicas
            applied = {r.replica_id for r in replicas if r.connected and r.applied_revision >= revision}
            return applied >= REPLICAS

        assert wait_until(both_applied, timeout=20), f"replicas did not apply revision {revision}"
    return revision


def post(stack: LocalStack, path: str, body: Any, key: str | None = "invoke") -> tuple[int, Any]:
    """POST JSON through Envoy; (HTTP status, decoded JSON body)."""
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["x-api-key"] = stack.credentials()[key]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://{stack.front_door}{path}", data=data, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        text = error.read()
        try:
            return error.code, json.loads(text)
        except ValueError:
            return error.code, text.decode(errors="replace")


def invocation(**fields: Any) -> dict[str, Any]:
    """An ecosystem.Ai /invocations payload."""
    payload = {
        "campaign": "telco-offers",
        "subcampaign": "",
        "channel": "app",
        "customer": "1001",
        "userid": "e2e",
        "numberoffers": "2",
        "params": "{}",
    }
    payload.update(fields)
    return payload


def invoke_ok(stack: LocalStack, payload: dict[str, Any]) -> dict[str, Any]:
    status, body = post(stack, "/invocations", payload)
    assert status == 200, body
    return dict(body)


@pytest.fixture(scope="module")
def revision(stack: LocalStack) -> int:
    revision = publish(stack, example_document())

    def rest_answers() -> bool:  # Envoy's health checks see the replicas SERVING
        return post(stack, "/invocations", invocation())[0] == 200

    assert wait_until(rest_answers, timeout=20)
    return revision


def test_invocations_accept_every_payload_form(stack: LocalStack, revision: int) -> None:
    forms: list[tuple[dict[str, Any], int, dict[str, str]]] = [
        (invocation(numberoffers="2"), 2, {}),
        (
            invocation(numberoffers=2, params={"age": 52, "gender": "f"}),
            2,
            {"age_band": "middle", "gender": "f"},
        ),
        (invocation(numberoffers=3, params=json.dumps({"age": 20})), 3, {"age_band": "young"}),
        (
            invocation(params=urllib.parse.quote(json.dumps({"age": 45, "channel": "web"}))),
            2,
            {"age_band": "middle", "channel": "web"},
        ),
        (
            invocation(params="", in_param=json.dumps({"trips_per_year": 6, "age": 61})),
            2,
            {"travel_band": "frequent", "age_band": "senior"},
        ),
        ({k: v for k, v in invocation().items() if k not in ("numberoffers", "params")}, 3, {}),  # defaults
    ]
    seen_replicas = set()
    for payload, count, context in forms:
        body = invoke_ok(stack, payload)
        assert body["uuid"]
        assert int(body["config_revision"]) == revision  # int64 is a JSON string in proto3 JSON
        assert body["deployment"] == "telco-offers"
        assert len(body["final_result"]) == count, (payload, body)
        for rank, row in enumerate(body["final_result"], start=1):
            result = row["result"]
            assert set(result) >= RESULT_FIELDS, result
            assert result["rank"] == rank
            assert 0.0 <= result["propensity"] <= 1.0
            assert 0.0 <= result["arm_reward"] <= 1.0
        got = body["final_result"][0]["result"]["context"]
        assert {k: got[k] for k in context} == context, (payload, got)
        seen_replicas.add(body["replica_id"])
    assert seen_replicas <= REPLICAS


def test_responses_accept_every_offers_accepted_form(stack: LocalStack, revision: int) -> None:
    def contact() -> dict[str, Any]:
        return invoke_ok(stack, invocation(customer="2002", numberoffers=3))

    shown = contact()
    first = shown["final_result"][0]["result"]
    status, body = post(
        stack, "/response", {"uuid": shown["uuid"], "offers_accepted": [{"offer_name": first["offer_name"]}]}
    )
    assert status == 200, body
    assert (body["learned"], body["duplicate"], body["matched_offers"]) == (True, False, [first["offer"]])
    # The same response again (wherever it lands): acknowledged as a duplicate, not learned.
    status, again = post(
        stack, "/response", {"uuid": shown["uuid"], "offers_accepted": [{"offer_name": first["offer_name"]}]}
    )
    assert status == 200, again
    assert (again["learned"], again["duplicate"]) == (False, True)

    shown = contact()
    second = shown["final_result"][1]["result"]
    status, body = post(stack, "/response", {"uuid": shown["uuid"], "offers_accepted": second["offer"]})
    assert status == 200, body
    assert body["matched_offers"] == [second["offer"]]

    shown = contact()
    offers = [row["result"]["offer"] for row in shown["final_result"][:2]]
    status, body = post(
        stack, "/response", {"uuid": shown["uuid"], "offers_accepted": offers, "channel_name": "app"}
    )
    assert status == 200, body
    assert sorted(body["matched_offers"]) == sorted(offers)

    shown = contact()
    status, body = post(stack, "/response", {"uuid": shown["uuid"], "offers_accepted": []})
    assert status == 200, body
    assert (body["learned"], body["matched_offers"]) == (False, [])


def test_errors_are_json_with_the_grpc_code_and_the_field(stack: LocalStack, revision: int) -> None:
    shown = invoke_ok(stack, invocation(numberoffers=1))
    cases: list[tuple[str, Any, int, int, str]] = [
        # (path, body, HTTP status, gRPC code, field the message starts with)
        ("/invocations", invocation(numberoffers="abc"), 400, 3, "numberoffers"),
        ("/invocations", invocation(numberoffers=-1), 400, 3, "numberoffers"),
        ("/invocations", invocation(numberoffers=99), 400, 3, "numberoffers"),
        ("/invocations", invocation(params="{not json"), 400, 3, "params"),
        ("/invocations", invocation(params="{" + " " * (1024 * 1024) + "}"), 400, 3, "params"),
        ("/invocations", invocation(customer=""), 400, 3, "customer"),
        ("/invocations", invocation(campaign="no-such-campaign"), 404, 5, "campaign"),
        ("/response", {"uuid": "no-such-uuid", "offers_accepted": ["data-1gb"]}, 404, 5, "uuid"),
        (
            "/response",
            {"uuid": shown["uuid"], "offers_accepted": ["no-such-offer"]},
            400,
            3,
            "offers_accepted",
        ),
        ("/response", {"uuid": shown["uuid"], "offers_accepted": 7}, 400, 3, "offers_accepted"),
        ("/response", {"uuid": ""}, 400, 3, "uuid"),
    ]
    for path, body, http_status, code, field in cases:
        status, reply = post(stack, path, body)
        assert (status, reply["code"]) == (http_status, code), (
            path,
            body if len(str(body)) < 300 else "...",
            reply,
        )
        assert reply["message"].startswith(f"{field}: "), reply
    # Without a key: 401 UNAUTHENTICATED, as JSON too.
    status, reply = post(stack, "/invocations", invocation(), key=None)
    assert (status, reply["code"]) == (401, 16)
    # A body that is not JSON at all is refused by the transcoder itself.
    status, _ = post(stack, "/invocations", b"{this is not json")
    assert status == 400
    # The replicas kept serving.
    assert len(invoke_ok(stack, invocation())["final_result"]) == 2


def test_refresh_resynchronises_a_replica(stack: LocalStack, revision: int) -> None:
    status, body = post(stack, "/refresh", {})
    assert status == 200, body
    assert int(body["config_revision"]) >= revision
    assert body["replica_id"] in REPLICAS


def live_document(step: int) -> dict[str, Any]:
    """Step `step` of the publishing loop: another epsilon, and an offer that comes and goes."""
    document = example_document()
    document["exploration_epsilon"] = round((step % 10) / 20, 2)
    if step % 2:
        document["offers"].append(
            {"id": "flash-sale", "name": "Flash sale", "price": 9.0, "category": "promo"}
        )
    return document


async def test_no_request_fails_during_live_publishes(stack: LocalStack, revision: int) -> None:
    publishes = 100
    published = [revision]
    failures: list[str] = []
    seen: dict[tuple[int, str], list[int]] = {}
    done = asyncio.Event()
    counts = [0]
    invoke_key, admin_key = stack.credentials()["invoke"], stack.credentials()["admin"]
    deadline = time.monotonic() + 150

    async def caller(worker: int) -> None:
        # One connection per caller, so Envoy balances them over both replicas.
        async with aio.insecure_channel(
            stack.front_door, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            stub = predictor_pb2_grpc.PredictorServiceStub(channel)
            metadata = (("x-api-key", invoke_key),)
            i = 0
            while not done.is_set() and time.monotonic() < deadline:
                i += 1
                request = predictor_pb2.InvokeRequest(
                    campaign="telco-offers", customer=f"live-{worker}-{i}", channel="app"
                )
                try:
                    reply = await stub.Invoke(request, metadata=metadata, timeout=10)
                    seen.setdefault((worker, reply.replica_id), []).append(int(reply.config_revision))
                    if i % 5 == 0:
                        await stub.Respond(
                            predictor_pb2.RespondRequest(
                                uuid=reply.uuid, accepted_offers=[reply.final_result[0].result.offer]
                            ),
                            metadata=metadata,
                            timeout=10,
                        )
                    counts[0] += 1
                except aio.AioRpcError as error:
                    failures.append(f"{error.code().name}: {error.details()}")

    async def publisher() -> None:
        async with open_channel(stack.front_door, api_key=admin_key, deadline_seconds=15) as channel:
            config = config_pb2_grpc.ConfigServiceStub(channel)
            try:
                for step in range(1, publishes + 1):
                    reply = await config.Publish(
                        config_pb2.PublishRequest(spec_text=json.dumps(live_document(step)))
                    )
                    published.append(int(reply.revision))
            finally:
                done.set()

    started = time.perf_counter()
    callers = [asyncio.create_task(caller(worker)) for worker in range(4)]
    await publisher()
    await asyncio.gather(*callers)
    elapsed = time.perf_counter() - started
    print(
        f"\n{publishes} publishes in {elapsed:.1f}s with {counts[0]} calls through Envoy, {len(failures)} failed"
    )
    served = {r for revisions in seen.values() for r in revisions}
    print(f"replies served with {len(served)} distinct revisions of the {len(published)} published")
    assert failures == [], failures[:5]
    assert len(served) > 10  # the calls really ran across the changes
    assert len(published) == publishes + 1
    assert published == sorted(set(published))
    assert counts[0] >= 100
    replicas_seen = {replica for _worker, replica in seen}
    assert replicas_seen == REPLICAS
    for (_worker, _replica), revisions in seen.items():
        assert set(revisions) <= set(published), sorted(set(revisions) - set(published))
        assert revisions == sorted(revisions)  # a replica never serves an older revision again
    # After the last publish both replicas converge on it.
    with open_blocking_channel(stack.front_door, api_key=admin_key, deadline_seconds=15) as channel:
        config = config_pb2_grpc.ConfigServiceStub(channel)

        def converged() -> bool:
            replicas = config.ReplicaStatus(config_pb2.ReplicaStatusRequest()).replicas
            return {r.replica_id for r in replicas if r.applied_revision == published[-1]} >= REPLICAS

        assert wait_until(converged, timeout=20)
    with open_blocking_channel(stack.front_door, api_key=invoke_key, deadline_seconds=10) as channel:
        ping = predictor_pb2_grpc.PredictorServiceStub(channel).Ping(predictor_pb2.PingRequest())
        assert ping.config_revision == published[-1]
