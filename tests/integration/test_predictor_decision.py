"""The decision loop over gRPC: an in-process config service and two predictor replicas (real servers
on port 0, auth on) sharing one real Redis. Publishes go through the config service and reach the
replicas over Watch, exactly as in production.

What is shown here: learning on one replica is visible on the other within a second (measured),
cold start, idempotent / late / unknown responses, logged propensities against the observed
frequency at rank 1, the decision log stream, bad input, and a property test over request fields.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
import urllib.parse
import uuid as uuid_module
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from google.protobuf.struct_pb2 import Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from libs.common import decision_log, redis_keys
from libs.common.client import open_blocking_channel, open_channel
from libs.common.decision_log import Contact, Response
from libs.common.server import RunningServer
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from services.config.server import build_server as build_config
from services.predictor.server import build_server as build_predictor
from tests.conftest import ApiKeys
from tests.grpc.conftest import SERVICES_UNDER_TEST, target
from tests.polling import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HEARTBEAT_SECONDS = 0.2
REPLICAS = ("replica-a", "replica-b")
OFFERS = ("alpha", "bravo", "charlie", "delta")


def value(item: Any) -> Value:
    """Any JSON-like Python value (NaN and infinities too) as a google.protobuf.Value."""
    holder = Struct()
    holder.update({"v": item})
    return holder.fields["v"]


def spec_document(name: str, **overrides: Any) -> dict[str, Any]:
    """A small deployment: four offers, a feature-free segment from params, Thompson, no decay."""
    document: dict[str, Any] = {
        "name": name,
        "campaigns": [name],
        "offers": [
            {"id": offer, "name": f"{offer.title()} offer", "price": 10.0 + i, "category": f"c{i % 2}"}
            for i, offer in enumerate(OFFERS)
        ],
        "context_variables": [
            {"name": "region", "source": "param", "default": "north"},
            {"name": "age", "source": "param", "kind": "numeric", "default": 30},
            {
                "name": "age_band",
                "source": "virtual",
                "segment": False,
                "transform": {"kind": "discretize", "input": "age", "edges": [40], "labels": ["y", "o"]},
            },
        ],
        "algorithm": {"approach": "thompson"},
        "default_number_of_offers": 2,
        "reward": {"window_seconds": 3600},
    }
    document.update(overrides)
    return document


@dataclass
class Loop:
    """The config service, two replicas, stubs on each and a Redis client on the shared store."""

    config: RunningServer
    replicas: list[RunningServer]
    admin: config_pb2_grpc.ConfigServiceStub
    predictors: list[predictor_pb2_grpc.PredictorServiceStub]
    redis: Redis
    invoke_key: str
    channels: list[aio.Channel] = field(default_factory=list)

    @property
    def a(self) -> predictor_pb2_grpc.PredictorServiceStub:
        return self.predictors[0]

    @property
    def b(self) -> predictor_pb2_grpc.PredictorServiceStub:
        return self.predictors[1]

    def replica_target(self, index: int) -> str:
        return target(self.replicas[index])

    async def publish(self, document: Mapping[str, Any]) -> int:
        """Publish and wait until both replicas serve the new revision."""
        reply = await self.admin.Publish(config_pb2.PublishRequest(spec_text=json.dumps(document)))
        revision = reply.revision

        async def both_on_it() -> bool:
            pings = [await stub.Ping(predictor_pb2.PingRequest()) for stub in self.predictors]
            return all(ping.config_revision >= revision for ping in pings)

        await eventually(both_on_it, what=f"both replicas on revision {revision}")
        return int(revision)

    async def arms(self, deployment: str, segment: str) -> dict[str, str]:
        raw = await self.redis.hgetall(redis_keys.arm_statistics(deployment, "0", segment))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def stream_tail_id(self) -> str:
        """The id of the newest decision log entry (read the log after it to see this test's entries)."""
        newest = await self.redis.xrevrange(redis_keys.DECISION_STREAM, count=1)
        return newest[0][0].decode() if newest else "0-0"

    async def log_entries(self, after: str, deployment: str) -> list[Contact | Response]:
        """This deployment's decision log entries after `after`, read as the monitor reads them."""
        entries = await self.redis.xrange(redis_keys.DECISION_STREAM, min=f"({after}")
        records = [decision_log.decode_entry(fields) for _id, fields in entries]
        return [record for record in records if record.deployment == deployment]

    async def contacts(self, after: str, deployment: str) -> dict[str, Contact]:
        entries = await self.log_entries(after, deployment)
        return {entry.uuid: entry for entry in entries if isinstance(entry, Contact)}


@pytest.fixture
async def loop(tmp_path: Path, api_keys: ApiKeys, redis_url: str) -> AsyncIterator[Loop]:
    config_settings = SERVICES_UNDER_TEST["config"].settings(
        tmp_path, api_keys, None, heartbeat_seconds=HEARTBEAT_SECONDS, poll_seconds=0.2
    )
    config = await build_config(config_settings)
    replicas: list[RunningServer] = []
    channels: list[aio.Channel] = []
    store = Redis.from_url(redis_url)
    try:
        for replica_id in REPLICAS:
            settings_ = SERVICES_UNDER_TEST["predictor"].settings(
                tmp_path,
                api_keys,
                redis_url,
                config_target=target(config),
                config_api_key=api_keys.service,
                replica_id=replica_id,
                state_dir=tmp_path / replica_id,
            )
            replicas.append(await build_predictor(settings_))
        admin_channel = open_channel(target(config), api_key=api_keys.admin, deadline_seconds=15)
        channels.append(admin_channel)
        predictors = []
        for running in replicas:
            channel = open_channel(target(running), api_key=api_keys.invoke, deadline_seconds=15)
            channels.append(channel)
            predictors.append(predictor_pb2_grpc.PredictorServiceStub(channel))
        yield Loop(
            config,
            replicas,
            config_pb2_grpc.ConfigServiceStub(admin_channel),
            predictors,
            store,
            api_keys.invoke,
            channels,
        )
    finally:
        for channel in channels:
            await channel.close()
        for running in replicas:
            await running.stop()
        await config.stop()
        await store.aclose()


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid_module.uuid4().hex[:10]}"


def invoke_request(campaign: str, customer: str = "c-1", **fields: Any) -> predictor_pb2.InvokeRequest:
    request = predictor_pb2.InvokeRequest(campaign=campaign, customer=customer, channel="app")
    for name in ("numberoffers", "params", "in_param"):
        if name in fields:
            getattr(request, name).CopyFrom(value(fields.pop(name)))
    for name, item in fields.items():
        setattr(request, name, item)
    return request


def respond_request(uuid: str, accepted: Any = None, **fields: Any) -> predictor_pb2.RespondRequest:
    request = predictor_pb2.RespondRequest(uuid=uuid, **fields)
    if accepted is not None:
        request.offers_accepted.CopyFrom(value(accepted))
    return request


def by_offer(reply: predictor_pb2.InvokeResponse) -> dict[str, predictor_pb2.FinalResult.Result]:
    return {row.result.offer: row.result for row in reply.final_result}


# Learning across replicas ----------------------------------------------------------------------


async def test_a_response_on_one_replica_changes_what_the_other_scores_within_a_second(loop: Loop) -> None:
    name = unique_name("learn")
    await loop.publish(spec_document(name, exploration_epsilon=0.0))
    everything = {"numberoffers": len(OFFERS)}
    shown = await loop.a.Invoke(invoke_request(name, **everything))
    assert {row.result.offer for row in shown.final_result} == set(OFFERS)
    segment = shown.segment
    # Thompson without decay: arm_reward = (1 + s) / (2 + n) with n = arm_count, so B's reply tells
    # how many successes B saw for the offer.
    before = by_offer(await loop.b.Invoke(invoke_request(name, **everything)))["charlie"]
    assert round(before.arm_reward * (2 + before.arm_count) - 1, 9) == 0

    answered = await loop.a.Respond(respond_request(shown.uuid, ["charlie"]))
    assert answered.learned
    assert list(answered.matched_offers) == ["charlie"]
    responded_at = time.perf_counter()

    async def b_sees_the_success() -> float | None:
        row = by_offer(await loop.b.Invoke(invoke_request(name, **everything)))["charlie"]
        successes = row.arm_reward * (2 + row.arm_count) - 1
        return time.perf_counter() - responded_at if abs(successes - 1) < 1e-9 else None

    latency = await eventually(b_sees_the_success, within=5, what="replica B sees the response")
    print(
        f"\ncross-replica learning latency (Respond on A returned -> B's Invoke reflects it): "
        f"{latency * 1000:.1f} ms"
    )
    assert latency < 1.0
    stored = await loop.arms(name, segment)
    assert float(stored["charlie|s"]) == 1.0


async def test_b_ranks_by_what_a_learned(loop: Loop) -> None:
    name = unique_name("greedy")
    await loop.publish(spec_document(name, algorithm={"approach": "epsilon_greedy"}, exploration_epsilon=0.0))
    shown = await loop.a.Invoke(invoke_request(name, numberoffers=len(OFFERS)))
    await loop.a.Respond(respond_request(shown.uuid, "Delta offer"))  # by name, as a plain string
    for _ in range(5):
        reply = await loop.b.Invoke(invoke_request(name, customer="someone-else"))
        assert reply.final_result[0].result.offer == "delta"
        assert reply.final_result[0].result.propensity == 1.0


# Logged propensities ---------------------------------------------------------------------------

INVOKES_FOR_PROPENSITY = 3000
STANDARD_ERRORS = 4.0  # two-sided, per offer: a false alarm about once in 16,000 comparisons


async def invoke_many(
    loop: Loop, name: str, total: int, numberoffers: int, tasks: int = 8
) -> list[predictor_pb2.InvokeResponse]:
    """`total` Invokes spread over both replicas by a few concurrent callers."""
    replies: list[predictor_pb2.InvokeResponse] = []

    async def caller(worker: int) -> None:
        for i in range(worker, total, tasks):
            stub = loop.predictors[i % 2]
            replies.append(await stub.Invoke(invoke_request(name, f"c-{i}", numberoffers=numberoffers)))

    await asyncio.gather(*(caller(worker) for worker in range(tasks)))
    return replies


async def seed_arms(loop: Loop, name: str, segment: str, counts: Mapping[str, tuple[float, float]]) -> None:
    key = redis_keys.arm_statistics(name, "0", segment)
    await loop.redis.hset(
        key,
        mapping={
            f"{offer}|{part}": x for offer, (n, s) in counts.items() for part, x in (("n", n), ("s", s))
        },
    )


def compare_with_frequency(contacts: Iterable[Contact]) -> tuple[dict[str, float], dict[str, float], float]:
    """Per offer: mean logged first-slot propensity and observed share at rank 1; the largest
    |difference| in standard errors. The propensities are exact (not estimates), so the noise is
    the Bernoulli noise of the choices alone."""
    contacts = list(contacts)
    total = len(contacts)
    logged: dict[str, float] = dict.fromkeys(OFFERS, 0.0)
    top: Counter[str] = Counter()
    for contact in contacts:
        top[contact.shown[0].offer] += 1
        for offer, propensity in zip(contact.eligible, contact.first_slot_propensities(), strict=True):
            logged[offer] += propensity
    mean_logged = {offer: logged[offer] / total for offer in OFFERS}
    observed = {offer: top[offer] / total for offer in OFFERS}
    worst = 0.0
    for offer in OFFERS:
        p = mean_logged[offer]
        # Var(sum of indicators) = sum p_t (1 - p_t) <= N p(1 - p) for the mean p (Jensen).
        standard_error = max(math.sqrt(p * (1 - p) / total), 1 / total)
        worst = max(worst, abs(observed[offer] - p) / standard_error)
    return mean_logged, observed, worst


async def test_logged_propensity_matches_observed_frequency_epsilon_greedy(loop: Loop) -> None:
    name = unique_name("propensity-eg")
    epsilon = 0.3
    await loop.publish(
        spec_document(name, algorithm={"approach": "epsilon_greedy"}, exploration_epsilon=epsilon)
    )
    # Skewed, heavy history: 3000 more impressions each barely move the take-up estimates.
    await seed_arms(
        loop,
        name,
        "region=north",
        {"alpha": (1e6, 3e5), "bravo": (1e6, 2e5), "charlie": (1e6, 1e5), "delta": (1e6, 5e4)},
    )
    started = time.perf_counter()
    tail = await loop.stream_tail_id()
    # Every offer is returned, so every offer's propensity for rank 1 is in every reply.
    replies = await invoke_many(loop, name, INVOKES_FOR_PROPENSITY, numberoffers=len(OFFERS))
    elapsed = time.perf_counter() - started

    # Analytically: (1 - eps) to the greedy best, eps / K to every offer by exploration.
    k = len(OFFERS)
    expected = {offer: (1 - epsilon) * (offer == "alpha") + epsilon / k for offer in OFFERS}
    contacts = await loop.contacts(tail, name)
    assert set(contacts) == {reply.uuid for reply in replies}
    for reply in replies:
        contact = contacts[reply.uuid]
        first = dict(zip(contact.eligible, contact.first_slot_propensities(), strict=True))
        assert first == pytest.approx(expected, abs=1e-12)
        # Rank 1 reports the first-slot propensity; ranks 2.. the probability given the ranks above.
        assert reply.final_result[0].result.propensity == pytest.approx(
            expected[reply.final_result[0].result.offer], abs=1e-12
        )
        assert all(0 < row.result.propensity <= 1 for row in reply.final_result)
    mean_logged, observed, worst = compare_with_frequency(contacts.values())
    print(
        f"\nepsilon-greedy eps={epsilon}: {len(replies)} Invokes in {elapsed:.1f}s; "
        f"logged {mean_logged}; observed {observed}; max deviation {worst:.2f} standard errors"
    )
    assert worst < STANDARD_ERRORS
    assert sum(reply.explore for reply in replies) / len(replies) == pytest.approx(
        epsilon, abs=STANDARD_ERRORS * math.sqrt(epsilon * (1 - epsilon) / len(replies))
    )

    # The decision log holds the same propensities, one contact per reply.
    for reply in replies:
        assert [(o.offer, o.propensity) for o in contacts[reply.uuid].shown] == [
            (row.result.offer, row.result.propensity) for row in reply.final_result
        ]


async def test_logged_propensity_matches_observed_frequency_thompson(loop: Loop) -> None:
    name = unique_name("propensity-ts")
    epsilon = 0.1
    await loop.publish(spec_document(name, exploration_epsilon=epsilon))
    # Close arms with long histories: the posterior is narrow but the winner is far from certain.
    await seed_arms(
        loop,
        name,
        "region=north",
        {
            "alpha": (1e5, 10_000),
            "bravo": (1e5, 9_950),
            "charlie": (1e5, 9_880),
            "delta": (1e5, 9_700),
        },
    )
    tail = await loop.stream_tail_id()
    started = time.perf_counter()
    replies = await invoke_many(loop, name, INVOKES_FOR_PROPENSITY, numberoffers=len(OFFERS))
    elapsed = time.perf_counter() - started
    contacts = await loop.contacts(tail, name)
    for reply in replies:
        first = contacts[reply.uuid].first_slot_propensities()
        assert sum(first) == pytest.approx(1.0)
        assert all(p >= epsilon / len(OFFERS) - 1e-12 for p in first)
        assert all(0 < row.result.propensity <= 1 for row in reply.final_result)
    mean_logged, observed, worst = compare_with_frequency(contacts.values())
    print(
        f"\nthompson eps={epsilon}: {len(replies)} Invokes in {elapsed:.1f}s; "
        f"logged {mean_logged}; observed {observed}; max deviation {worst:.2f} standard errors"
    )
    assert worst < STANDARD_ERRORS
    assert 0.15 < mean_logged["alpha"] < 0.85  # a genuinely randomised choice, not a sure thing

    for reply in replies:
        logged = contacts[reply.uuid]
        assert logged.shown[0].propensity == reply.final_result[0].result.propensity
        assert logged.replica == reply.replica_id
        assert logged.config_revision == reply.config_revision


# Cold start, responses -------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["thompson", "epsilon_greedy", "naive_bayes"])
async def test_cold_start_never_fails_and_fills_at_random(loop: Loop, algorithm: str) -> None:
    name = unique_name(f"cold-{algorithm.replace('_', '-')}")
    await loop.publish(spec_document(name, algorithm={"approach": algorithm}))
    assert await loop.arms(name, "region=north") == {}
    replies = await invoke_many(loop, name, 400, numberoffers=len(OFFERS))
    top: Counter[str] = Counter()
    for reply in replies:
        offers = [row.result.offer for row in reply.final_result]
        assert sorted(offers) == sorted(OFFERS)  # every slot filled, no offer twice
        assert [row.result.rank for row in reply.final_result] == [1, 2, 3, 4]
        top[offers[0]] += 1
    # No evidence anywhere (every offer shown every time, nobody answered): each offer leads about
    # a quarter of the time. 400 draws: the standard error of one share is 0.022.
    assert set(top) == set(OFFERS)
    assert all(
        abs(count / len(replies) - 0.25) < 4 * math.sqrt(0.25 * 0.75 / len(replies)) for count in top.values()
    ), top
    if algorithm != "thompson":  # deterministic scorers split exact ties evenly, slot by slot
        for reply in replies:
            assert [row.result.propensity for row in reply.final_result] == pytest.approx(
                [1 / 4, 1 / 3, 1 / 2, 1]
            )


async def test_a_repeated_response_is_acknowledged_as_duplicate_and_learns_nothing(loop: Loop) -> None:
    name = unique_name("idempotent")
    await loop.publish(spec_document(name))
    shown = await loop.a.Invoke(invoke_request(name, numberoffers=3))
    offer = shown.final_result[0].result.offer
    first = await loop.a.Respond(respond_request(shown.uuid, [{"offer_name": offer}]))
    assert (first.learned, first.duplicate, first.late) == (True, False, False)
    after_first = await loop.arms(name, shown.segment)
    assert float(after_first[f"{offer}|s"]) == 1.0

    # Again, on the other replica, by id and by name: nothing changes.
    name_of_offer = shown.final_result[0].result.offer_name
    for stub, accepted in ((loop.b, [offer]), (loop.a, name_of_offer), (loop.b, [{"offer": offer}])):
        again = await stub.Respond(respond_request(shown.uuid, accepted))
        assert (again.learned, again.duplicate) == (False, True), again
        assert list(again.matched_offers) == []
        assert await loop.arms(name, shown.segment) == after_first

    # A response without uptake, twice: the second is the duplicate.
    other = await loop.a.Invoke(invoke_request(name))
    before = await loop.arms(name, other.segment)
    none_taken = await loop.b.Respond(respond_request(other.uuid, []))
    assert (none_taken.learned, none_taken.duplicate) == (False, False)
    repeated = await loop.a.Respond(respond_request(other.uuid))
    assert (repeated.learned, repeated.duplicate) == (False, True)
    assert await loop.arms(name, other.segment) == before


async def test_responds_cancelled_at_random_points_learn_every_acknowledged_response_once(loop: Loop) -> None:
    """A Respond cut off anywhere (before, during or after its commit) and retried
    until acknowledged, as a client or Envoy retries: every response is learned exactly once, never
    lost behind a "duplicate" and never counted twice (marking, learning and logging commit together)."""
    name = unique_name("cancelled")
    await loop.publish(spec_document(name))
    tail = await loop.stream_tail_id()
    rng = random.Random(5)
    contacts = [await loop.a.Invoke(invoke_request(name, f"c-{i}", numberoffers=1)) for i in range(300)]
    cut_off = 0
    for index, shown in enumerate(contacts):
        offer = shown.final_result[0].result.offer
        for attempt in range(200):
            stub = loop.predictors[(index + attempt) % 2]
            # The client gives up at a random point of the call (grpcio's own short deadlines run on a
            # clock 1-2 s behind, grpc/grpc#34547): the server's handler is cancelled wherever it is.
            patience = rng.uniform(0.0001, 0.003) if attempt < 5 else 10.0
            try:
                await asyncio.wait_for(stub.Respond(respond_request(shown.uuid, [offer])), timeout=patience)
                break
            except TimeoutError:
                cut_off += 1
    assert cut_off > 0  # the deadlines did cut calls off

    async def logged() -> list[Response] | None:
        responses = [e for e in await loop.log_entries(tail, name) if isinstance(e, Response)]
        learned = [response for response in responses if response.learned]
        return learned if len(learned) >= len(contacts) else None

    learned = await eventually(logged, within=20, what="every response logged")
    assert sorted(response.uuid for response in learned) == sorted(shown.uuid for shown in contacts)
    successes = 0.0
    for segment in {shown.segment for shown in contacts}:
        arms = await loop.arms(name, segment)
        successes += sum(float(value) for key, value in arms.items() if key.endswith("|s"))
    assert successes == len(contacts)  # each learned once: none lost, none twice


async def test_a_reward_plugin_reads_the_payload_sent_with_respond(loop: Loop) -> None:
    """The example package's amount_reward (installed with .venv): Respond's payload over gRPC
    reaches it, and the statistics learn its reward times the channel's weight."""
    name = unique_name("payload")
    plugin = {
        "name": "amount_reward",
        "stage": "reward",
        "params": {"scale": 0.01, "channel_weights": {"call-centre": 0.5}},
    }
    await loop.publish(spec_document(name, plugins=[plugin]))
    shown = await loop.a.Invoke(invoke_request(name, numberoffers=1))
    offer = shown.final_result[0].result.offer
    request = respond_request(shown.uuid, [offer])
    request.channel_name = "call-centre"
    request.payload.update({"amount": 60})
    answered = await loop.b.Respond(request)
    assert answered.learned, answered
    arms = await loop.arms(name, shown.segment)
    assert float(arms[f"{offer}|s"]) == pytest.approx(0.6 * 0.5)


async def test_a_late_response_is_logged_but_not_learned(loop: Loop) -> None:
    name = unique_name("late")
    await loop.publish(spec_document(name, reward={"window_seconds": 60}))
    shown = await loop.a.Invoke(invoke_request(name))
    offer = shown.final_result[0].result.offer
    before = await loop.arms(name, shown.segment)
    tail = await loop.stream_tail_id()
    event_time = Timestamp()
    event_time.FromNanoseconds(time.time_ns() + 120 * 10**9)  # two minutes after the contact
    late = await loop.b.Respond(respond_request(shown.uuid, [offer], event_time=event_time))
    assert (late.learned, late.late, late.duplicate) == (False, True, False)
    assert "reward window" in late.message
    assert await loop.arms(name, shown.segment) == before
    (logged,) = [e for e in await loop.log_entries(tail, name) if isinstance(e, Response)]
    assert logged.uuid == shown.uuid
    assert logged.late is True
    assert logged.learned is False
    assert logged.learned_offers == []
    assert logged.accepted == [offer]

    # Inside the window (an explicit event time one second after the contact) it is learned.
    in_time = await loop.a.Invoke(invoke_request(name))
    event_time.FromNanoseconds(time.time_ns() + 10**9)
    on_time = await loop.b.Respond(
        respond_request(in_time.uuid, [in_time.final_result[0].result.offer], event_time=event_time)
    )
    assert (on_time.learned, on_time.late) == (True, False)


async def test_unknown_uuid_and_unknown_offer_are_clean_errors(loop: Loop) -> None:
    name = unique_name("respond-errors")
    await loop.publish(spec_document(name))
    with pytest.raises(aio.AioRpcError) as unknown:
        await loop.a.Respond(respond_request(str(uuid_module.uuid4()), ["alpha"]))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert (unknown.value.details() or "").startswith("uuid: ")

    shown = await loop.a.Invoke(invoke_request(name, numberoffers=1))
    not_shown = next(offer for offer in OFFERS if offer != shown.final_result[0].result.offer)
    for accepted in (["no-such-offer"], [not_shown], "Nonsense offer"):
        with pytest.raises(aio.AioRpcError) as bad:
            await loop.b.Respond(respond_request(shown.uuid, accepted))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (bad.value.details() or "").startswith("offers_accepted: ")
    # The failed attempts consumed nothing: the real response is still learned.
    taken = await loop.a.Respond(respond_request(shown.uuid, [shown.final_result[0].result.offer]))
    assert taken.learned


async def test_decision_log_has_contacts_and_responses_with_their_fields(loop: Loop) -> None:
    name = unique_name("log")
    revision = await loop.publish(spec_document(name, exploration_epsilon=0.2))
    tail = await loop.stream_tail_id()
    shown = await loop.a.Invoke(invoke_request(name, customer="log-customer", numberoffers=2))
    answered = await loop.b.Respond(
        respond_request(shown.uuid, [shown.final_result[1].result.offer], channel_name="sms", reward=0.5)
    )
    contact, response = await loop.log_entries(tail, name)
    assert isinstance(contact, Contact)
    assert isinstance(response, Response)
    assert contact.uuid == shown.uuid
    assert (contact.config_revision, contact.replica, contact.customer) == (
        revision,
        "replica-a",
        "log-customer",
    )
    assert (contact.campaign, contact.channel, contact.segment) == (name, "app", "region=north")
    assert (contact.variant, contact.options_generation, contact.deployment) == ("", "0", name)
    assert contact.explore == bool(shown.explore)
    assert contact.latency_ms > 0
    # Every context value, numeric ones as numbers (the reply carries them as text).
    assert {k: str(v) for k, v in contact.context.items()} == dict(shown.final_result[0].result.context)
    assert contact.context["age"] == 30.0
    # Every eligible offer with its score and first-slot propensity; the shown ones with rank.
    assert sorted(contact.eligible) == sorted(OFFERS)
    assert len(contact.eligible_scores) == len(OFFERS)
    assert sum(contact.first_slot_propensities()) == pytest.approx(1.0)
    assert min(contact.first_slot_propensities()) >= 0.2 / len(OFFERS) - 1e-12
    assert [(o.offer, o.rank, o.propensity, o.explored) for o in contact.shown] == [
        (r.result.offer, r.result.rank, r.result.propensity, r.result.explored) for r in shown.final_result
    ]
    first = dict(zip(contact.eligible, contact.first_slot_propensities(), strict=True))
    assert first[contact.shown[0].offer] == contact.shown[0].propensity
    assert response.uuid == shown.uuid
    assert list(response.accepted) == list(response.learned_offers) == list(answered.matched_offers)
    assert (response.reward, response.channel, response.replica) == (0.5, "sms", "replica-b")
    assert (response.learned, response.late, response.duplicate) == (True, False, False)
    assert response.time >= contact.time


# Bad input -------------------------------------------------------------------------------------

ONE_MEGABYTE = 1024 * 1024

# (case, request fields, expected status, field named at the start of the message); None: served.
BAD_INVOKES: list[tuple[str, dict[str, Any], grpc.StatusCode | None, str]] = [
    ("malformed params JSON", {"params": "{not json"}, grpc.StatusCode.INVALID_ARGUMENT, "params"),
    ("params JSON not an object", {"params": "[1, 2]"}, grpc.StatusCode.INVALID_ARGUMENT, "params"),
    ("params a number", {"params": 7}, grpc.StatusCode.INVALID_ARGUMENT, "params"),
    ("params a list", {"params": ["region"]}, grpc.StatusCode.INVALID_ARGUMENT, "params"),
    (
        "params 1 MB string",
        {"params": "{" + " " * ONE_MEGABYTE + "}"},
        grpc.StatusCode.INVALID_ARGUMENT,
        "params",
    ),
    ("params deeply nested", {"params": "[" * 50_000}, grpc.StatusCode.INVALID_ARGUMENT, "params"),
    ("bad URL-encoded params", {"params": "%7B%22region"}, grpc.StatusCode.INVALID_ARGUMENT, "params"),
    ("malformed in_param", {"in_param": "{oops"}, grpc.StatusCode.INVALID_ARGUMENT, "in_param"),
    ("numberoffers zero", {"numberoffers": 0}, None, ""),  # documented: 0 means the default
    ("numberoffers '0'", {"numberoffers": "0"}, None, ""),
    ("numberoffers negative", {"numberoffers": -1}, grpc.StatusCode.INVALID_ARGUMENT, "numberoffers"),
    ("numberoffers '-2'", {"numberoffers": "-2"}, grpc.StatusCode.INVALID_ARGUMENT, "numberoffers"),
    ("numberoffers non-numeric", {"numberoffers": "two"}, grpc.StatusCode.INVALID_ARGUMENT, "numberoffers"),
    ("numberoffers fractional", {"numberoffers": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "numberoffers"),
    ("numberoffers boolean", {"numberoffers": True}, grpc.StatusCode.INVALID_ARGUMENT, "numberoffers"),
    ("numberoffers infinite", {"numberoffers": math.inf}, grpc.StatusCode.INVALID_ARGUMENT, "numberoffers"),
    ("numberoffers NaN", {"numberoffers": math.nan}, grpc.StatusCode.INVALID_ARGUMENT, "numberoffers"),
    ("numberoffers a list", {"numberoffers": [2]}, grpc.StatusCode.INVALID_ARGUMENT, "numberoffers"),
    (
        "numberoffers above the limit",
        {"numberoffers": 1001},
        grpc.StatusCode.INVALID_ARGUMENT,
        "numberoffers",
    ),
    ("numberoffers huge", {"numberoffers": 1e300}, grpc.StatusCode.INVALID_ARGUMENT, "numberoffers"),
    ("unknown campaign", {"campaign": "no-such-campaign"}, grpc.StatusCode.NOT_FOUND, "campaign"),
    ("empty campaign", {"campaign": ""}, grpc.StatusCode.INVALID_ARGUMENT, "campaign"),
    ("unknown deployment", {"deployment": "no-such-deployment"}, grpc.StatusCode.NOT_FOUND, "deployment"),
    ("empty customer", {"customer": ""}, grpc.StatusCode.INVALID_ARGUMENT, "customer"),
    ("customer too long", {"customer": "x" * 300}, grpc.StatusCode.INVALID_ARGUMENT, "customer"),
    # A 70 KB identifier echoed into a status message would overflow Envoy's header limit and reset
    # the whole upstream connection, every other client's calls on it included.
    ("campaign huge", {"campaign": "x" * 70_000}, grpc.StatusCode.INVALID_ARGUMENT, "campaign"),
    ("deployment huge", {"deployment": "x" * 70_000}, grpc.StatusCode.INVALID_ARGUMENT, "deployment"),
    ("subcampaign huge", {"subcampaign": "x" * 70_000}, grpc.StatusCode.INVALID_ARGUMENT, "subcampaign"),
    ("userid huge", {"userid": "x" * 70_000}, grpc.StatusCode.INVALID_ARGUMENT, "userid"),
    ("channel huge", {"channel": "x" * 70_000}, grpc.StatusCode.INVALID_ARGUMENT, "channel"),
]


async def assert_still_serving(loop: Loop, name: str) -> None:
    for stub in loop.predictors:
        reply = await stub.Invoke(invoke_request(name, numberoffers=2))
        assert len(reply.final_result) == 2


@pytest.mark.parametrize(("case", "fields", "status", "named"), BAD_INVOKES, ids=[c[0] for c in BAD_INVOKES])
async def test_bad_invoke_input(
    loop: Loop, case: str, fields: dict[str, Any], status: grpc.StatusCode | None, named: str
) -> None:
    name = unique_name("bad-invoke")
    await loop.publish(spec_document(name))
    fields = dict(fields)
    campaign = fields.pop("campaign", name)
    customer = fields.pop("customer", "c-1")
    request = invoke_request(campaign, customer, **fields)
    if status is None:
        reply = await loop.a.Invoke(request)
        assert len(reply.final_result) == 2  # the deployment's default_number_of_offers
    else:
        with pytest.raises(aio.AioRpcError) as error:
            await loop.a.Invoke(request)
        assert error.value.code() == status, error.value.details()
        assert (error.value.details() or "").startswith(f"{named}: "), error.value.details()
        assert len(error.value.details() or "") < 500  # the message does not echo a huge input
    await assert_still_serving(loop, name)


async def test_bad_respond_input(loop: Loop) -> None:
    name = unique_name("bad-respond")
    await loop.publish(spec_document(name))
    shown = await loop.a.Invoke(invoke_request(name, numberoffers=2))
    offer = shown.final_result[0].result.offer
    before = await loop.arms(name, shown.segment)
    cases: list[tuple[predictor_pb2.RespondRequest, grpc.StatusCode, str]] = [
        (respond_request(""), grpc.StatusCode.INVALID_ARGUMENT, "uuid"),
        (respond_request("u" * 65), grpc.StatusCode.INVALID_ARGUMENT, "uuid"),
        (respond_request("no-such-uuid", [offer]), grpc.StatusCode.NOT_FOUND, "uuid"),
        (respond_request(shown.uuid, 5), grpc.StatusCode.INVALID_ARGUMENT, "offers_accepted"),
        (respond_request(shown.uuid, [{"name": offer}]), grpc.StatusCode.INVALID_ARGUMENT, "offers_accepted"),
        (respond_request(shown.uuid, [[offer]]), grpc.StatusCode.INVALID_ARGUMENT, "offers_accepted"),
        (respond_request(shown.uuid, ["zulu"]), grpc.StatusCode.INVALID_ARGUMENT, "offers_accepted"),
        (respond_request(shown.uuid, [offer], reward=math.nan), grpc.StatusCode.INVALID_ARGUMENT, "reward"),
        (respond_request(shown.uuid, [offer], reward=math.inf), grpc.StatusCode.INVALID_ARGUMENT, "reward"),
        (respond_request(shown.uuid, [offer], reward=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "reward"),
        (respond_request(shown.uuid, [offer], reward=1e308), grpc.StatusCode.INVALID_ARGUMENT, "reward"),
    ]
    for request, status, named in cases:
        with pytest.raises(aio.AioRpcError) as error:
            await loop.b.Respond(request)
        assert error.value.code() == status, (request, error.value.details())
        assert (error.value.details() or "").startswith(f"{named}: "), error.value.details()
    assert await loop.arms(name, shown.segment) == before  # nothing learned, nothing corrupted
    # None of the refusals used the response up.
    answered = await loop.a.Respond(respond_request(shown.uuid, [offer]))
    assert answered.learned
    await assert_still_serving(loop, name)


# Live publishes --------------------------------------------------------------------------------

LINEAR_VARIABLES = [
    {"name": "region", "source": "param", "default": "north"},
    {"name": "age", "source": "param", "kind": "numeric", "default": 30},
    {"name": "score", "source": "param", "kind": "numeric", "default": 0.5},
]
ALGORITHMS: list[dict[str, Any]] = [
    {"approach": "thompson"},
    {"approach": "epsilon_greedy"},
    {"approach": "linucb", "features": ["age"]},
    {"approach": "naive_bayes"},
    {"approach": "linucb", "features": ["age", "score"]},
    {"approach": "linear_thompson", "features": ["score"]},
    {"approach": "thompson", "half_life_seconds": 600, "count_cap": 1000},
]


def changing_spec(name: str, step: int) -> dict[str, Any]:
    """Revision `step`: another epsilon, algorithm and feature set, and an offer that comes and goes."""
    document = spec_document(
        name,
        context_variables=LINEAR_VARIABLES,
        exploration_epsilon=(step % 5) / 10,
        algorithm=ALGORITHMS[step % len(ALGORITHMS)],
    )
    if step % 2:
        document["offers"].append({"id": "echo", "name": "Echo offer"})
    return document


async def test_live_publishes_fail_no_request_and_learning_survives_algorithm_changes(loop: Loop) -> None:
    name = unique_name("live")
    published = [await loop.publish(changing_spec(name, 0))]
    failures: list[str] = []
    seen: dict[tuple[int, str], list[int]] = {}
    stop = asyncio.Event()
    calls = 0

    async def caller(worker: int) -> None:
        nonlocal calls
        while not stop.is_set():
            stub = loop.predictors[calls % 2]
            calls += 1
            try:
                reply = await stub.Invoke(
                    invoke_request(name, f"live-{worker}-{calls}", numberoffers=2, params={"age": calls % 70})
                )
                seen.setdefault((worker, reply.replica_id), []).append(reply.config_revision)
                # Answer the previous revision's contacts too: algorithms change under them.
                answer = await loop.predictors[calls % 2].Respond(
                    respond_request(reply.uuid, [reply.final_result[calls % 2].result.offer])
                )
                assert answer.learned or "other features" in answer.message, answer
            except (aio.AioRpcError, AssertionError) as exc:
                failures.append(repr(exc))

    workers = [asyncio.create_task(caller(worker)) for worker in range(4)]
    try:
        for step in range(1, 29):
            reply = await loop.admin.Publish(
                config_pb2.PublishRequest(spec_text=json.dumps(changing_spec(name, step)))
            )
            published.append(int(reply.revision))
            served = calls

            async def some_calls_served(mark: int = served) -> bool:
                return calls >= mark + 4  # let a few calls land on (or around) each revision

            await eventually(some_calls_served, what="calls keep being served")
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert failures == [], failures[:5]
    assert calls > 50
    for (_worker, _replica), revisions in seen.items():
        assert set(revisions) <= set(published)
        assert revisions == sorted(revisions)  # a replica never goes back to an older revision


async def test_respond_to_a_contact_made_before_the_algorithm_changed(loop: Loop) -> None:
    name = unique_name("switch")
    thompson = spec_document(name, context_variables=LINEAR_VARIABLES)
    linear = dict(thompson, algorithm={"approach": "linucb", "features": ["age"]})
    wider = dict(thompson, algorithm={"approach": "linucb", "features": ["age", "score"]})
    await loop.publish(linear)
    first = await loop.a.Invoke(invoke_request(name, params={"age": 20}))  # a linear model now exists
    await loop.publish(thompson)
    arm_contact = await loop.a.Invoke(invoke_request(name))
    await loop.publish(linear)
    # The contact was scored by Thompson (no feature vector); learning it as linear must not fail.
    answer = await loop.b.Respond(
        respond_request(arm_contact.uuid, [arm_contact.final_result[0].result.offer])
    )
    assert answer.uuid == arm_contact.uuid
    # More features: old models have the wrong dimension; Invoke and Respond keep working.
    await loop.publish(wider)
    for stub in loop.predictors:
        reply = await stub.Invoke(invoke_request(name, numberoffers=4, params={"age": 50, "score": 0.1}))
        assert len(reply.final_result) == 4
        answered = await stub.Respond(respond_request(reply.uuid, [reply.final_result[0].result.offer]))
        assert answered.learned
    stale = await loop.a.Respond(respond_request(first.uuid, [first.final_result[0].result.offer]))
    assert stale.uuid == first.uuid


# Property: any request fields -------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(st.characters(codec="utf-8"), max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
param_objects = st.dictionaries(
    st.sampled_from(["region", "age", "channel", "exclude", "gender"]) | st.text(max_size=8),
    json_values | st.sampled_from(["north", "south", "alpha,bravo", ["charlie"]]),
    max_size=4,
)
params_field = (
    st.none()
    | param_objects
    | param_objects.map(json.dumps)
    | param_objects.map(lambda p: urllib.parse.quote(json.dumps(p)))
    | param_objects.map(lambda p: json.dumps(json.dumps(p)))
    | st.text(st.characters(codec="utf-8"), max_size=30)
    | json_values
)
numberoffers_field = (
    st.none()
    | st.integers(-3, 8)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["2", " 3 ", "0", "-1", "1e3", "", "NaN", "0x2", "\uff14"])
    | st.text(max_size=5)
    | st.booleans()
    | st.lists(st.integers(0, 3), max_size=2)
)


def mostly(usual: st.SearchStrategy[Any], unusual: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`usual` about four times in five (st.one_of does not weight its branches)."""
    return st.integers(0, 4).flatmap(lambda pick: unusual if pick == 0 else usual)


ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


def property_spec(name: str) -> dict[str, Any]:
    document = spec_document(name, exploration_epsilon=0.1)
    document["offers"][3]["eligibility"] = [
        {"variable": "region", "operator": "in", "value": ["north", "east"]}
    ]
    document["offers"][2]["eligibility"] = [{"variable": "age", "operator": "ge", "value": 18}]
    document["plugins"] = [
        {"name": "exclude_offers", "stage": "pre_score", "params": {"param": "exclude"}},
        {"name": "value_weighting", "stage": "post_score", "params": {"basis": "price"}},
        {"name": "category_cap", "stage": "post_score", "params": {"max_per_category": 1}},
    ]
    return document


def assert_arm_statistics_sound(redis_url: str, deployment: str) -> int:
    """Every field of every arm hash of the deployment is a finite number, 0 <= successes <= impressions."""
    client = redis.Redis.from_url(redis_url)
    try:
        hashes = 0
        for key in client.scan_iter(match=f"ll:arms:{deployment}:*", count=1000):
            hashes += 1
            fields = {k.decode(): float(v) for k, v in client.hgetall(key).items()}
            assert all(math.isfinite(x) for x in fields.values()), (key, fields)
            for offer in {name.rpartition("|")[0] for name in fields}:
                n, s_ = fields.get(f"{offer}|n", 0.0), fields.get(f"{offer}|s", 0.0)
                assert 0.0 <= s_ <= n + 1e-9, (key, offer, n, s_)
        return hashes
    finally:
        client.close()


async def test_any_request_fields_give_a_clean_answer_and_sound_statistics(
    loop: Loop, redis_url: str
) -> None:
    name = unique_name("property")
    await loop.publish(property_spec(name))
    targets = [loop.replica_target(0), loop.replica_target(1)]
    statuses: Counter[str] = Counter()

    def call(stub_method: Any, request: Any) -> Any:
        try:
            reply = stub_method(request)
        except grpc.RpcError as error:
            code, details = error.code(), error.details()
        else:
            statuses["OK"] += 1
            return reply
        statuses[code.name] += 1
        assert code in ALLOWED, (request, code, details)
        assert details, request
        return None

    def explore() -> None:
        channels = [open_blocking_channel(t, api_key=loop.invoke_key, deadline_seconds=15) for t in targets]
        stubs = [predictor_pb2_grpc.PredictorServiceStub(c) for c in channels]

        @settings(
            max_examples=200,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(
            data=st.data(),
            # Mostly valid values, so that Respond and the statistics get exercised too.
            campaign=mostly(st.just(name), st.sampled_from(["", "no-such-campaign"]) | st.text(max_size=8)),
            customer=mostly(
                st.sampled_from(["c-1", "c-2", "c-3"]), st.text(st.characters(codec="utf-8"), max_size=300)
            ),
            numberoffers=st.one_of(st.none(), st.integers(0, 4), numberoffers_field),
            params=st.one_of(st.none(), param_objects, params_field),
            in_param=st.one_of(*[st.none()] * 3, params_field),
            replica=st.integers(0, 1),
        )
        def one_exchange(
            data: st.DataObject,
            campaign: str,
            customer: str,
            numberoffers: Any,
            params: Any,
            in_param: Any,
            replica: int,
        ) -> None:
            fields = {
                key: item
                for key, item in (("numberoffers", numberoffers), ("params", params), ("in_param", in_param))
                if item is not None
            }
            reply = call(stubs[replica].Invoke, invoke_request(campaign, customer, **fields))
            shown = [r.result.offer for r in reply.final_result] if reply is not None else []
            names = [r.result.offer_name for r in reply.final_result] if reply is not None else []
            choices = st.sampled_from([*shown, *names, "zulu"])
            accepted = data.draw(
                st.one_of(
                    st.none(),
                    choices,
                    st.lists(choices, max_size=3),
                    st.lists(st.fixed_dictionaries({"offer_name": choices}), max_size=2),
                    json_values,
                ),
                label="offers_accepted",
            )
            uuid = reply.uuid if reply is not None else "no-such-uuid"
            uuid = data.draw(mostly(st.just(uuid), st.just("") | st.text(max_size=70)), label="uuid")
            extra: dict[str, Any] = {}
            reward = data.draw(
                st.one_of(
                    st.none(), st.none(), st.floats(0, 1), st.floats(allow_nan=True, allow_infinity=True)
                ),
                label="reward",
            )
            if reward is not None:
                extra["reward"] = reward
            seconds = data.draw(
                st.one_of(st.none(), st.none(), st.integers(-(10**13), 10**13)), label="event_time"
            )
            if seconds is not None:
                extra["event_time"] = Timestamp(seconds=seconds)
            call(stubs[1 - replica].Respond, respond_request(uuid, accepted, **extra))
            if data.draw(st.booleans(), label="respond twice"):
                call(stubs[replica].Respond, respond_request(uuid, accepted, **extra))

        try:
            one_exchange()
        finally:
            for channel in channels:
                channel.close()

    started = time.perf_counter()
    await asyncio.to_thread(explore)
    hashes = assert_arm_statistics_sound(redis_url, name)
    print(
        f"\nproperty test: {dict(statuses)} in {time.perf_counter() - started:.1f}s; {hashes} arm hashes sound"
    )
    assert statuses["OK"] > 0
    await assert_still_serving(loop, name)


# Request forms ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"region": "south", "age": 50},
        json.dumps({"region": "south", "age": 50}),
        urllib.parse.quote(json.dumps({"region": "south", "age": 50})),
        urllib.parse.quote_plus(json.dumps({"region": "south", "age": "50"})),
        json.dumps(json.dumps({"region": "south", "age": 50})),
    ],
    ids=["object", "json-string", "url-encoded", "url-encoded-plus", "doubly-encoded"],
)
async def test_params_in_every_form_reach_the_context(loop: Loop, params: Any) -> None:
    name = unique_name("params")
    await loop.publish(spec_document(name))
    reply = await loop.a.Invoke(invoke_request(name, params=params))
    assert reply.segment == "region=south"
    context = reply.final_result[0].result.context
    assert (context["region"], context["age"], context["age_band"]) == ("south", "50.0", "o")


async def test_in_param_is_merged_under_params(loop: Loop) -> None:
    name = unique_name("in-param")
    await loop.publish(spec_document(name))
    alone = await loop.a.Invoke(invoke_request(name, in_param=json.dumps({"region": "east", "age": 20})))
    assert alone.segment == "region=east"
    both = await loop.b.Invoke(
        invoke_request(name, in_param={"region": "east", "age": 20}, params='{"region": "south"}')
    )
    context = both.final_result[0].result.context
    assert (both.segment, context["age_band"]) == ("region=south", "y")  # params wins, in_param fills


async def test_numberoffers_forms_and_a_default_above_the_offer_count(loop: Loop) -> None:
    name = unique_name("count")
    await loop.publish(spec_document(name, default_number_of_offers=10))
    for numberoffers, expected in ((None, 4), (0, 4), ("0", 4), ("3", 3), (3, 3), (3.0, 3), (" 1 ", 1)):
        fields = {} if numberoffers is None else {"numberoffers": numberoffers}
        reply = await loop.a.Invoke(invoke_request(name, **fields))
        assert len(reply.final_result) == expected, numberoffers
    # More than there are: those there are, and the warnings say so.
    reply = await loop.a.Invoke(invoke_request(name, numberoffers=5))
    assert len(reply.final_result) == 4
    assert "5 offers asked for, 4 eligible" in reply.warnings


# Keeps Redis busy for ARGV[1] milliseconds, as a slow command or a failover pause would.
REDIS_STALL = """
local start = redis.call('TIME')
repeat
  local now = redis.call('TIME')
until (now[1] - start[1]) * 1000000 + (now[2] - start[2]) > tonumber(ARGV[1]) * 1000
return 1
"""


async def test_a_burst_during_a_redis_stall_waits_instead_of_failing(loop: Loop) -> None:
    # While Redis stalls, every request in flight holds a Redis connection: more than a pool's
    # default size (100 in redis-py). They arrive over several connections, as through Envoy (one
    # HTTP/2 connection carries at most 100 streams).
    name = unique_name("burst")
    await loop.publish(spec_document(name))
    stall = asyncio.create_task(loop.redis.eval(REDIS_STALL, 0, 400))
    channels = [
        aio.insecure_channel(loop.replica_target(0), options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(4)
    ]
    metadata = (("x-api-key", loop.invoke_key),)
    try:
        stubs = [predictor_pb2_grpc.PredictorServiceStub(channel) for channel in channels]
        replies = await asyncio.gather(
            *(
                stubs[i % 4].Invoke(invoke_request(name, f"burst-{i}"), metadata=metadata, timeout=30)
                for i in range(400)
            ),
            return_exceptions=True,
        )
        await stall
        failures = [reply for reply in replies if isinstance(reply, BaseException)]
        assert failures == [], f"{len(failures)} failed, e.g. {failures[:1]}"
        answers = await asyncio.gather(
            *(
                stubs[i % 4].Respond(
                    respond_request(reply.uuid, [reply.final_result[0].result.offer]),
                    metadata=metadata,
                    timeout=30,
                )
                for i, reply in enumerate(replies)
                if isinstance(reply, predictor_pb2.InvokeResponse)
            ),
            return_exceptions=True,
        )
        failures = [answer for answer in answers if isinstance(answer, BaseException)]
        assert failures == [], f"{len(failures)} failed, e.g. {failures[:1]}"
    finally:
        for channel in channels:
            await channel.close()
