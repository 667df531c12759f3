"""Respond answered in Redis (services/predictor/core/answer_in_redis.py) against the reference,
the answer in Python: the same Invokes and Responds, on a real Redis, once with the contact able to
be answered by the script and once with its facts removed (so the script leaves it to Python).
Both must reply the same, log the same response entries, and leave the same statistics and the
same marks. The script's own path is checked to have been taken: one round trip per Respond."""

from __future__ import annotations

import asyncio
import uuid as uuid_module
from collections.abc import AsyncIterator
from dataclasses import astuple, dataclass, replace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from libs.common import redis_keys
from libs.common.config_follower import AppliedConfig
from libs.common.decision_log import Response, decode_entry
from libs.common.deployment_spec import deployment_spec_from_mapping
from libs.common.errors import LiveloopError
from libs.policy.statistics import ArmPolicy
from services.predictor.core import answer_in_redis
from services.predictor.core.decision import DecisionEngine, InvokeInput, RespondInput
from services.predictor.core.engine_simulation import SimulatedClock, applied_config
from services.predictor.core.options_store import OptionsStore
from services.predictor.core.statistics_stores import Scope

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

OFFERS = ("alpha", "bravo", "charlie", "delta", "echo")
START = 1_765_000_000.125


@dataclass(frozen=True)
class Store:
    redis: Redis
    options: OptionsStore  # one for every run: its batches hold a connection of their own
    clock: SimulatedClock


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    client = Redis.from_url(redis_url)
    await client.script_load(answer_in_redis.RESPOND)  # a first NOSCRIPT would cost a round trip
    clock = SimulatedClock(START)
    try:
        yield Store(client, OptionsStore(client, clock=clock), clock)
    finally:
        await client.aclose()


@dataclass(frozen=True)
class Reply:
    """A Respond's reply, or its error, with the uuid left out (each run hands out its own)."""

    outcome: tuple[Any, ...] | None
    error: tuple[str, str | None, str] | None


@dataclass(frozen=True)
class Run:
    replies: list[Reply]
    responses: list[Response]  # the log's response entries, uuid and latency left out
    statistics: dict[bytes, bytes]
    contact: dict[bytes, bytes]  # without the facts field
    round_trips: list[int]  # per Respond
    shown: list[str]


# How a client names an accepted offer: mostly by the id it was shown with, sometimes by its name
# (which Python matches), now and then one that was not shown (an error).
NAMED_BY = st.sampled_from(["id", "id", "id", "id", "id", "name", "not shown"])


def accepted_offers(shown: list[str], picks: list[tuple[str, int]]) -> list[str]:
    named = []
    for named_by, index in picks:
        offer = shown[index % len(shown)]
        if named_by == "name":
            named.append(f"{offer.title()} offer")
        elif named_by == "not shown":
            named.append(next((other for other in OFFERS if other not in shown), "zulu"))
        else:
            named.append(offer)
    return named


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    forgetting: dict[str, Any] = (
        {"change_detection": True}  # alone: it decides what to forget itself
        if draw(st.booleans())
        else {
            "half_life_seconds": draw(st.sampled_from([None, 90.0])),
            "half_life_impressions": draw(st.sampled_from([None, 5.0])),
            "window_seconds": draw(st.sampled_from([None, 45.0])),
            "count_cap": draw(st.sampled_from([None, 3.0])),
        }
    )
    spec: dict[str, Any] = {
        "offers": [{"id": offer, "name": f"{offer.title()} offer"} for offer in OFFERS],
        "algorithm": {"approach": "thompson", **forgetting},
        "context_variables": [{"name": "region", "source": "param", "default": "north"}],
        "default_number_of_offers": draw(st.integers(1, 3)),
        "reward": {
            "window_seconds": draw(st.sampled_from([60.0, 3600.0])),
            "default_reward": draw(st.sampled_from([1.0, 0.25])),
        },
    }
    responds = []
    for _ in range(draw(st.integers(1, 3))):
        responds.append(
            {
                "accepted": draw(st.lists(st.tuples(NAMED_BY, st.integers(0, 4)), max_size=3)),
                "reward": draw(st.sampled_from([None, None, 0.0, -0.0, 2.5, 1e-7, 7.0, -1.0])),
                "after": draw(
                    st.sampled_from([0.5, 59.0, 60.0, 61.0, 4000.0])
                ),  # seconds after the Invoke (60: the window)
                "event_time": draw(st.sampled_from([None, "at", "before"])),
                "channel": draw(st.sampled_from(["", "app", 'we"b/\\ é'])),
            }
        )
    return {"spec": spec, "responds": responds, "region": draw(st.sampled_from(["north", "sü/d"]))}


async def run(store: Store, name: str, scenario: dict[str, Any], *, in_redis: bool) -> Run:
    spec = deployment_spec_from_mapping({"name": name, **scenario["spec"]})
    redis_client, options, clock = store.redis, store.options, store.clock
    clock.now = START
    engine = DecisionEngine(options, "replica-x", rng=np.random.default_rng(11))
    config = applied_config(spec, revision=7)
    tail = await redis_client.xrevrange(redis_keys.DECISION_STREAM, count=1)
    after = tail[0][0].decode() if tail else "0-0"

    params = {"region": scenario["region"]}
    decision = await engine.invoke(InvokeInput(name, "", "", "customer-1", "", None, params, None), config)
    contact_key = redis_keys.contact(decision.uuid)
    shown = [row.offer.id for row in decision.offers]
    if not in_redis:
        assert await redis_client.hdel(contact_key, answer_in_redis.FACTS_FIELD) == 1

    replies: list[Reply] = []
    round_trips: list[int] = []
    for respond in scenario["responds"]:
        clock.now = START + respond["after"]
        event_time = {None: None, "at": START + respond["after"], "before": START + 1.0}[
            respond["event_time"]
        ]
        accepted = accepted_offers(shown, respond["accepted"])
        request = RespondInput(
            decision.uuid.upper(), accepted, respond["channel"], respond["reward"], event_time
        )
        sent = options.batched_round_trips
        try:
            outcome = await engine.respond(request, config)
        except LiveloopError as error:
            replies.append(Reply(None, (type(error).__name__, error.field, str(error))))
        else:
            replies.append(Reply(astuple(replace(outcome, uuid="")), None))
        round_trips.append(options.batched_round_trips - sent)

    responses = []
    for _, fields in await redis_client.xrange(redis_keys.DECISION_STREAM, min=f"({after}"):
        record = decode_entry(fields)
        if isinstance(record, Response) and record.deployment == name:
            responses.append(replace(record, uuid="", latency_ms=0.0))
    statistics_key = redis_keys.arm_statistics(name, "0", decision.segment)
    statistics = await redis_client.hgetall(statistics_key)
    contact = await redis_client.hgetall(contact_key)
    contact.pop(answer_in_redis.FACTS_FIELD.encode(), None)
    await redis_client.delete(statistics_key, contact_key)
    return Run(replies, responses, statistics, contact, round_trips, shown)


def answered_by_the_script(respond: dict[str, Any]) -> bool:
    """Offers named by the ids they were shown with, and no negative reward (Python words that error)."""
    return all(named_by == "id" for named_by, _ in respond["accepted"]) and not (
        respond["reward"] is not None and respond["reward"] < 0
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario=scenarios())
async def test_answered_in_redis_as_in_python(store: Store, scenario: dict[str, Any]) -> None:
    name = f"answer-{uuid_module.uuid4().hex[:8]}"
    script = await run(store, name, scenario, in_redis=True)
    python = await run(store, name, scenario, in_redis=False)
    assert script.replies == python.replies
    assert script.responses == python.responses
    assert script.statistics == python.statistics
    assert script.contact == python.contact
    for respond, script_trips, python_trips in zip(
        scenario["responds"], script.round_trips, python.round_trips, strict=True
    ):
        if answered_by_the_script(respond):
            assert script_trips == 1
            assert python_trips >= 2  # the read, then the guarded commit
        else:  # the script's reply is Python's read: no round trip more
            assert script_trips <= python_trips


async def test_racing_answers_in_redis_and_in_python_learn_each_offer_once(store: Store) -> None:
    """Responds to one contact at once, half answered by the script, half in Python (offers named by
    name): each offer is learned exactly once, by the one Respond that reports it."""
    name = f"answer-{uuid_module.uuid4().hex[:8]}"
    spec = deployment_spec_from_mapping(
        {
            "name": name,
            "offers": [{"id": o, "name": f"{o.title()} offer"} for o in OFFERS],
            "default_number_of_offers": 3,
        }
    )
    store.clock.now = START
    engine = DecisionEngine(store.options, "replica-x", rng=np.random.default_rng(3))
    config = applied_config(spec, revision=7)
    decision = await engine.invoke(InvokeInput(name, "", "", "customer-1", "", None, None, None), config)
    shown = [row.offer.id for row in decision.offers]
    requests = [
        RespondInput(decision.uuid, [shown[i % 3] if i % 2 else f"{shown[i % 3].title()} offer"])
        for i in range(30)
    ]
    outcomes = await asyncio.gather(*(engine.respond(request, config) for request in requests))

    learned = [offer for outcome in outcomes for offer in outcome.matched_offers]
    assert sorted(learned) == sorted(shown)
    assert sum(outcome.duplicate for outcome in outcomes) == 30 - 3
    statistics = await store.redis.hgetall(redis_keys.arm_statistics(name, "0", decision.segment))
    assert {offer: float(statistics[f"{offer}|s".encode()]) for offer in shown} == dict.fromkeys(shown, 1.0)
    assert {offer: float(statistics[f"{offer}|n".encode()]) for offer in shown} == dict.fromkeys(shown, 1.0)


async def test_a_reward_plugin_turns_the_payload_into_the_reward_learned_in_python(store: Store) -> None:
    """A deployment with reward plugins is answered in Python (its contacts carry no facts for the
    script): the example package's amount_reward reads the payload, the statistics learn the
    reward times the channel's learning weight, and the log keeps both."""
    name = f"answer-{uuid_module.uuid4().hex[:8]}"
    reward_plugin = {
        "name": "amount_reward",
        "stage": "reward",
        "params": {"scale": 0.01, "cap": 1.0, "channel_weights": {"call-centre": 0.5}},
    }
    spec = deployment_spec_from_mapping(
        {"name": name, "offers": [{"id": o} for o in OFFERS], "plugins": [reward_plugin]}
    )
    store.clock.now = START
    engine = DecisionEngine(store.options, "replica-x", rng=np.random.default_rng(3))
    config = applied_config(spec, revision=7)
    tail = await store.redis.xrevrange(redis_keys.DECISION_STREAM, count=1)
    after = tail[0][0].decode() if tail else "0-0"
    outcomes = []
    for payload, channel in (({"amount": 40}, "call-centre"), ({"amount": 30}, "app")):
        decision = await engine.invoke(InvokeInput(name, "", "", "customer-1", "", None, None, None), config)
        contact = await store.redis.hgetall(redis_keys.contact(decision.uuid))
        assert answer_in_redis.FACTS_FIELD.encode() not in contact
        offer = decision.offers[0].offer.id
        sent = store.options.batched_round_trips
        outcomes.append(
            await engine.respond(RespondInput(decision.uuid, [offer], channel, payload=payload), config)
        )
        assert store.options.batched_round_trips - sent == 2  # the read, then the guarded commit
    assert all(outcome.learned for outcome in outcomes)

    responses = [
        record
        for _, fields in await store.redis.xrange(redis_keys.DECISION_STREAM, min=f"({after}")
        if isinstance(record := decode_entry(fields), Response) and record.deployment == name
    ]
    assert [(r.credited_reward, r.learning_weight) for r in responses] == [(0.4, 0.5), (0.3, 1.0)]
    statistics = await store.redis.hgetall(
        redis_keys.arm_statistics(name, "0", decisions_segment := responses[0].segment)
    )
    learned = sum(float(v) for k, v in statistics.items() if k.endswith(b"|s"))
    assert learned == pytest.approx(0.4 * 0.5 + 0.3)
    del decisions_segment


async def test_the_script_answers_every_deployment_of_a_config_at_its_own_revision(store: Store) -> None:
    """A deployment keeps the revision it last changed at while others change (here 3 and 5 of a
    config at 5): the script compares the whole config's revision, so both are answered in Redis.
    A replica that follows only some deployments, and text Redis cannot take, go to Python."""
    names = [f"answer-{uuid_module.uuid4().hex[:8]}" for _ in range(2)]
    deployments = {}
    for name, revision in zip(names, (3, 5), strict=True):
        spec = deployment_spec_from_mapping({"name": name, "offers": [{"id": o} for o in OFFERS]})
        deployments[name] = applied_config(spec, revision=revision).deployments[name]
    config = AppliedConfig(5, deployments, "stream")
    store.clock.now = START
    engine = DecisionEngine(store.options, "replica-x", rng=np.random.default_rng(3))
    filtering = DecisionEngine(
        store.options, "replica-y", rng=np.random.default_rng(3), answers_in_redis=False
    )

    async def round_trips(engine: DecisionEngine, name: str, channel: str = "") -> int:
        decision = await engine.invoke(InvokeInput(name, "", "", "customer-1", "", None, None, None), config)
        sent = store.options.batched_round_trips
        answered = await engine.respond(
            RespondInput(decision.uuid, [decision.offers[0].offer.id], channel), config
        )
        assert answered.learned
        return store.options.batched_round_trips - sent

    assert [await round_trips(engine, name) for name in names] == [1, 1]
    assert [await round_trips(filtering, name) for name in names] == [2, 2]
    assert await round_trips(engine, names[0], channel="\ud800") == 2  # a lone surrogate: Python escapes it


async def test_a_response_answered_in_redis_drops_every_replicas_kept_statistics(
    store: Store, redis_url: str
) -> None:
    """The script publishes the segment's key (every replica drops its kept copy) and the replica
    that answered drops its own at once."""
    name = f"answer-{uuid_module.uuid4().hex[:8]}"
    spec = deployment_spec_from_mapping({"name": name, "offers": [{"id": o} for o in OFFERS]})
    config = applied_config(spec, revision=7)
    keeping = OptionsStore(store.redis, clock=store.clock, statistics_max_age=60.0)
    engine = DecisionEngine(keeping, "replica-x", rng=np.random.default_rng(3))
    store.clock.now = START
    listener = Redis.from_url(redis_url)
    pubsub = listener.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(redis_keys.ARM_UPDATES_CHANNEL)
    try:
        decision = await engine.invoke(InvokeInput(name, "", "", "customer-1", "", None, None, None), config)
        key = redis_keys.arm_statistics(name, "0", decision.segment)
        await engine.invoke(InvokeInput(name, "", "", "customer-2", "", None, None, None), config)
        scope = Scope(name, "0", decision.segment)
        assert keeping.arms.kept(scope, ArmPolicy(), store.clock.now) is not None  # a copy is kept
        answered = await engine.respond(RespondInput(decision.uuid, [decision.offers[0].offer.id]), config)
        assert answered.learned
        assert keeping.arms.kept(scope, ArmPolicy(), store.clock.now) is None  # dropped at once
        async with asyncio.timeout(10):
            message = None
            while message is None:  # the subscription's confirmation reads as None first
                message = await pubsub.get_message(timeout=1)
        assert message["data"].decode() == key
    finally:
        await pubsub.aclose()
        await listener.aclose()


async def test_a_contact_an_older_replica_wrote_is_answered_in_python(store: Store) -> None:
    """A contact whose facts came from a replica before the facts named their format (no half-life
    in impressions, and a segment with `|` in its statistics key the script would misread) is left
    to Python: learned once, correctly, in two round trips."""
    name = f"answer-{uuid_module.uuid4().hex[:8]}"
    spec = deployment_spec_from_mapping(
        {
            "name": name,
            "offers": [{"id": o} for o in OFFERS],
            "context_variables": [
                {"name": "region", "source": "param", "default": "north"},
                {"name": "tier", "source": "param", "default": "gold"},
            ],
        }
    )
    store.clock.now = START
    engine = DecisionEngine(store.options, "replica-x", rng=np.random.default_rng(3))
    config = applied_config(spec, revision=7)
    statistics_key = ""
    # The facts before they named a format (five numbers), and as format f2 wrote them (six).
    for old_layout in ("untagged", "f2"):
        decision = await engine.invoke(InvokeInput(name, "", "", f"c-{old_layout}", "", 1, {}, None), config)
        key = redis_keys.contact(decision.uuid)
        facts = (await store.redis.hget(key, answer_in_redis.FACTS_FIELD)).decode()
        assert facts.startswith(f"{answer_in_redis.FACTS_FORMAT}|7|")
        statistics_key = redis_keys.arm_statistics(name, "0", decision.segment)
        assert "|" in statistics_key
        numbers = facts.removeprefix(f"{answer_in_redis.FACTS_FORMAT}|").removesuffix("|" + statistics_key)
        kept = numbers.split("|")[: 6 if old_layout == "untagged" else 7]  # the revision, then the numbers
        old = "|".join((["f2"] if old_layout == "f2" else []) + kept + [statistics_key])
        await store.redis.hset(key, answer_in_redis.FACTS_FIELD, old)
        offer = decision.offers[0].offer.id
        before = float((await store.redis.hgetall(statistics_key)).get(f"{offer}|s".encode(), 0))
        sent = store.options.batched_round_trips
        outcome = await engine.respond(RespondInput(decision.uuid, [offer]), config)
        assert outcome.learned
        assert store.options.batched_round_trips - sent >= 2  # not answered by the script: Python commits
        after = float((await store.redis.hgetall(statistics_key))[f"{offer}|s".encode()])
        assert after == before + 1.0, old_layout
