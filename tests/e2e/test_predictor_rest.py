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
from tests.e2e.conftest import REPO, LocalStack, local_stack, started

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

EXAMPLE = REPO / "examples" / "deployments" / "telco-offers.yaml"
REPLICAS = {"predictor-1", "predictor-2"}
RESULT_FIELDS = {"offer", "offer_name", "score", "final_score", "arm_reward", "propensity", "rank", "context"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """One stack for the module (starting one takes a while)."""
    with started(local_stack(tmp_path_factory.mktemp("predictor-rest") / "state")) as local:
        yield local


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


def post(
    stack: LocalStack, path: str, body: Any, key: str | None = "invoke", method: str = "POST"
) -> tuple[int, Any]:
    """Send JSON through Envoy; (HTTP status, decoded JSON body). Every reply, errors included, must
    be JSON: a body that is not fails the test here."""
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["x-api-key"] = stack.credentials()[key]
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://{stack.front_door}{path}", data=data, headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.headers["content-type"].startswith("application/json"), response.headers
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        status, content_type, text = error.code, error.headers["content-type"] or "", error.read()
    assert content_type.startswith("application/json"), (path, status, content_type, text)
    return status, json.loads(text)


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
        # That runtime's parallel arrays: the context values given directly.
        (
            invocation(params={"input": ["age", "channel"], "value": [61, "web"]}),
            2,
            {"age_band": "senior", "channel": "web"},
        ),
        (
            invocation(params=json.dumps({"input": ["trips_per_year"], "value": [8]})),
            2,
            {"travel_band": "frequent"},
        ),
        # No customer at all (that runtime's default is "none"), and a numeric one.
        ({k: v for k, v in invocation().items() if k != "customer"}, 2, {}),
        (invocation(customer=1234), 2, {}),
    ]
    seen_replicas = set()
    for payload, count, context in forms:
        body = invoke_ok(stack, payload)
        assert body["uuid"]
        assert body["config_revision"] == revision
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
        assert body["customer"] == {None: "none", 1234: "1234"}.get(
            payload.get("customer"), payload.get("customer")
        )
        assert not [w for w in body["warnings"] if "unknown field" in w], body["warnings"]
        seen_replicas.add(body["replica_id"])
    assert seen_replicas <= REPLICAS


def test_the_reply_carries_what_that_runtimes_clients_read(stack: LocalStack, revision: int) -> None:
    body = invoke_ok(
        stack,
        invocation(
            numberoffers=3,
            subcampaign="spring",
            userid="crm",
            params={"age": 52, "unused": "x"},
            in_param={"a": 1},
        ),
    )
    assert body["config_revision"] == revision  # a number, as that runtime sends it
    assert body["in_params"] == {"age": 52, "unused": "x", "a": 1}  # the params used, echoed
    assert isinstance(body["in_params"]["age"], int)  # a whole number stays one
    assert "model" not in body  # no model bound
    context = body["final_result"][0]["result"]["context"]
    assert context["age"] == 52  # numbers as numbers
    assert isinstance(context["age_band"], str)
    assert (body["subcampaign"], body["userid"]) == ("spring", "crm")
    offers = {offer["id"]: offer for offer in example_document()["offers"]}
    for rank, row in enumerate(body["final_result"], start=1):
        result = row["result"]
        offer = offers[result["offer"]]
        assert result["rank"] == rank
        assert result["offer_name"] == offer["name"]
        assert result["offer_name_desc"] == offer.get("attributes", {}).get("description", offer["name"])
        assert (result["price"], result["cost"]) == (offer.get("price", 0.0), offer.get("cost", 0.0))
        assert result["modified_offer_score"] == result["final_score"]
        full = result["result_full"]
        # Thompson sampling: the Beta posterior the score was drawn from, and the exact propensity.
        assert full["alpha"] >= 1.0
        assert full["beta"] >= 1.0
        assert full["arm_reward"] == pytest.approx(full["alpha"] / (full["alpha"] + full["beta"]))
        assert full["propensity"] == result["propensity"]
        assert full["explore"] in (0, 1)
    # More offers than there are: as many as are eligible, and a warning (as that runtime answers).
    many = invoke_ok(stack, invocation(numberoffers=99, params={"trips_per_year": 6}))
    assert len(many["final_result"]) == 7
    assert "99 offers asked for, 7 eligible" in many["warnings"]
    # The channel may come in params only: the reply and the decision log carry it.
    assert invoke_ok(stack, invocation(channel="", params={"channel": "web"}))["channel"] == "web"
    # An unknown top-level field is ignored, and the reply says so.
    status, warned = post(stack, "/invocations", invocation(campain="typo"))
    assert status == 200
    assert "unknown field 'campain' ignored" in warned["warnings"]


def test_a_call_may_narrow_the_offers_and_override_exploration(stack: LocalStack, revision: int) -> None:
    offers = example_document()["offers"]
    two = [offers[0]["id"], offers[1]["name"]]  # by id or by name, as that runtime takes them
    for params in (
        {"eligible_offers": two},
        {"eligible_offers": ",".join(two)},
        {"eligible_offers": json.dumps(two)},
    ):
        body = invoke_ok(stack, invocation(numberoffers=3, params=params))
        shown = {row["result"]["offer"] for row in body["final_result"]}
        assert shown == {offers[0]["id"], offers[1]["id"]}, body
        assert any("2 eligible" in warning for warning in body["warnings"]), body["warnings"]
    body = invoke_ok(stack, invocation(params={"eligible_offers": [offers[0]["id"], "no-such-offer"]}))
    assert "params.eligible_offers names no offer of 'telco-offers': no-such-offer" in body["warnings"]
    for _ in range(5):  # epsilon 1 for this call: always explored, each of the 7 offers equally likely first
        body = invoke_ok(
            stack,
            invocation(
                numberoffers=1, params={"trips_per_year": 6, "mab": {"class": "mabone", "epsilon": 1}}
            ),
        )
        assert body["explore"] == 1
        assert body["final_result"][0]["result"]["propensity"] == pytest.approx(1 / len(offers))
        assert any("params.mab.class 'mabone' ignored" in warning for warning in body["warnings"])
    status, reply = post(stack, "/invocations", invocation(params={"mab": {"epsilon": 2}}))
    assert (status, reply["code"]) == (400, 3)
    assert reply["message"].startswith("params.mab.epsilon: "), reply


def test_flatten_json_gives_flat_keys(stack: LocalStack, revision: int) -> None:
    for payload in (
        invocation(numberoffers=2, in_param={"flatten_json": True}),
        invocation(numberoffers=2, in_param=urllib.parse.quote(json.dumps({"flatten_json": True}))),
        invocation(numberoffers=2, flatten_json=True),
    ):
        body = invoke_ok(stack, payload)
        assert "final_result" not in body
        assert body["final_result_0_result_rank"] == 1
        assert body["final_result_1_result_rank"] == 2
        assert isinstance(body["final_result_0_result_offer"], str)
        assert body["uuid"]
        assert all(not isinstance(value, dict | list) or value in ({}, []) for value in body.values())


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

    # The whole /invocations reply echoed back: every offer in it accepted, as that runtime does.
    shown = contact()
    status, body = post(stack, "/response", shown)
    assert status == 200, body
    assert body["learned"] is True
    assert sorted(body["matched_offers"]) == sorted(row["result"]["offer"] for row in shown["final_result"])
    assert body["warnings"] == []

    # offers_accepted as objects with offer_id, and as the reply's own final_result rows.
    shown = contact()
    first = shown["final_result"][0]["result"]["offer"]
    status, body = post(stack, "/response", {"uuid": shown["uuid"], "offers_accepted": [{"offer_id": first}]})
    assert (status, body["matched_offers"]) == (200, [first]), body
    shown = contact()
    rows = shown["final_result"][:2]
    status, body = post(stack, "/response", {"uuid": shown["uuid"], "offers_accepted": rows})
    assert status == 200, body
    assert sorted(body["matched_offers"]) == sorted(row["result"]["offer"] for row in rows)

    # A flattened reply echoed back is accepted the same way.
    flat = invoke_ok(stack, invocation(customer="2002", numberoffers=2, flatten_json=True))
    status, body = post(stack, "/response", flat)
    assert status == 200, body
    assert sorted(body["matched_offers"]) == sorted(
        [flat["final_result_0_result_offer"], flat["final_result_1_result_offer"]]
    )
    assert body["warnings"] == []

    # The uuid in capitals, and the event time in milliseconds since the epoch (as many clients send it).
    shown = contact()
    first = shown["final_result"][0]["result"]["offer"]
    answer = {"uuid": shown["uuid"].upper(), "offers_accepted": first, "event_time": int(time.time() * 1000)}
    status, body = post(stack, "/response", answer)
    assert (status, body["learned"], body["late"]) == (200, True, False), body
    # A time in the future is a client error, not a late response whose reward is dropped.
    shown = contact()
    status, body = post(
        stack,
        "/response",
        {"uuid": shown["uuid"], "offers_accepted": first, "event_time": "2099-01-01T00:00:00Z"},
    )
    assert (status, body["code"]) == (400, 3), body
    assert body["message"].startswith("event_time: "), body

    # /responseResult is the same call.
    shown = contact()
    first = shown["final_result"][0]["result"]["offer"]
    status, body = post(stack, "/responseResult", {"uuid": shown["uuid"], "offers_accepted": first})
    assert (status, body["learned"], body["matched_offers"]) == (200, True, [first]), body


def test_errors_are_json_with_the_grpc_code_and_the_field(stack: LocalStack, revision: int) -> None:
    shown = invoke_ok(stack, invocation(numberoffers=1))
    cases: list[tuple[str, Any, int, int, str]] = [
        # (path, body, HTTP status, gRPC code, field the message starts with)
        ("/invocations", invocation(numberoffers="abc"), 400, 3, "numberoffers"),
        ("/invocations", invocation(numberoffers=-1), 400, 3, "numberoffers"),
        ("/invocations", invocation(numberoffers=1001), 400, 3, "numberoffers"),
        ("/invocations", invocation(params="{not json"), 400, 3, "params"),
        ("/invocations", invocation(params="{" + " " * (1024 * 1024) + "}"), 400, 3, "params"),
        ("/invocations", invocation(customer=True), 400, 3, "customer"),
        ("/invocations", invocation(params={"input": ["a", "b"], "value": [1]}), 400, 3, "params.value"),
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
    # A body that is not JSON at all is refused by the transcoder itself, as JSON in the same shape.
    status, reply = post(stack, "/invocations", b"{this is not json")
    assert (status, reply["code"]) == (400, 3), reply
    assert reply["message"].startswith("body: "), reply
    assert reply["message"].endswith("(/invocations)"), reply
    # A body over the front door's limit: 413, JSON, naming the body.
    status, reply = post(stack, "/invocations", invocation(params={"x": "y" * (5 * 1024 * 1024)}))
    assert (status, reply["code"]) == (413, 8), reply
    assert reply["message"].startswith("body: "), reply
    assert reply["details"] == []  # the same shape as the services' errors
    # A path nobody serves: 404; a served path with another method: 405; both JSON, never a 503.
    status, reply = post(stack, "/no/such/path", {})
    assert (status, reply["code"]) == (404, 5), reply
    assert reply["message"] == "path: no such path (POST /no/such/path)", reply
    for method, path in (("GET", "/invocations"), ("PUT", "/response"), ("DELETE", "/health")):
        status, reply = post(stack, path, None, method=method)
        assert (status, reply["code"]) == (405, 12), (method, path, reply)
        assert reply["message"] == f"method: method not allowed ({method} {path})", reply
    # The replicas kept serving.
    assert len(invoke_ok(stack, invocation())["final_result"]) == 2


def test_refresh_reaches_every_replica_and_health_says_what_is_up(stack: LocalStack, revision: int) -> None:
    for method, body in (("POST", {}), ("GET", None)):
        status, reply = post(stack, "/refresh", body, method=method)
        assert status == 200, reply
        assert reply["replicas_notified"] == len(REPLICAS), reply  # every replica, not the one Envoy picked
        assert int(reply["head_revision"]) >= revision
    seen = set()
    for _ in range(20):  # no key: balancers and probes send none
        status, health = post(stack, "/health", None, key=None, method="GET")
        assert status == 200, health
        assert health["status"] == "UP"
        assert health["config_revision"] >= revision
        assert health["deployments"] == 1
        seen.add(health["replica_id"])
    assert seen <= REPLICAS


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


def test_a_new_key_works_and_a_revoked_one_stops_without_a_restart(stack: LocalStack, revision: int) -> None:
    created = stack.cli("keys", "create", "--role", "invoke", "--name", "app-team", "--json")
    assert created.returncode == 0, created.stderr
    document = json.loads(created.stdout)
    headers = {"content-type": "application/json", "x-api-key": document["api_key"]}

    def status_with_new_key() -> int:
        request = urllib.request.Request(
            f"http://{stack.front_door}/invocations", data=json.dumps(invocation()).encode(), headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    assert wait_until(lambda: status_with_new_key() == 200, timeout=10), "the new key was not taken"
    listed = stack.cli("keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert document["key_id"] in {row["key_id"] for row in json.loads(listed.stdout)}
    revoked = stack.cli("keys", "revoke", document["key_id"])
    assert revoked.returncode == 0, revoked.stderr
    assert wait_until(lambda: status_with_new_key() == 401, timeout=10), "the revoked key still works"
    again = stack.cli("keys", "revoke", document["key_id"])
    assert again.returncode == 1
    assert "no key" in again.stderr
