"""The options store's Lua scripts on a real Redis: half-life decay, the two-bucket sliding window,
the count cap, response marking (idempotency), linear model updates, and no lost updates under
concurrency. The clock is injected, so decay and windows are exact, not timing-dependent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import uuid as uuid_module
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Connection, Redis
from redis.exceptions import ResponseError

from libs.common import redis_keys
from libs.common.errors import InvalidArgument
from libs.policy.statistics import DECAY_UNCHANGED, ArmFields, ArmPolicy, parse_arms
from services.predictor.core.options_store import OptionsStore
from services.predictor.core.statistics_stores import Scope
from tests.polling import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@dataclass
class Clock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Store:
    store: OptionsStore
    redis: Redis
    clock: Clock
    deployment: str

    @property
    def key(self) -> str:
        return redis_keys.arm_statistics(self.deployment, "0", "all")

    @property
    def scope(self) -> Scope:
        return Scope(self.deployment, "0", "all")

    async def update(self, policy: ArmPolicy, *updates: tuple[str, float, float]) -> None:
        pipeline = self.store.pipeline()
        self.store.arms.queue_update(pipeline, self.scope, policy, list(updates), self.clock.now)
        await self.store.send(pipeline)

    async def raw(self) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in (await self.redis.hgetall(self.key)).items()}

    async def read(
        self, policy: ArmPolicy, offers: tuple[str, ...] = ("a",)
    ) -> dict[str, tuple[float, float]]:
        statistics = await self.store.read_statistics("arms", self.scope, offers, policy)
        return {offer: (arm.impressions, arm.successes) for offer, arm in statistics.arms.items()}


@pytest.fixture
async def options(redis_url: str) -> AsyncIterator[Store]:
    client = Redis.from_url(redis_url, max_connections=256)  # 200 updates truly in flight at once
    clock = Clock()
    deployment = f"store-{uuid_module.uuid4().hex[:10]}"
    try:
        yield Store(OptionsStore(client, clock=clock), client, clock, deployment)
    finally:
        keys = [key async for key in client.scan_iter(match=f"ll:*{deployment}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_without_ageing_evidence_just_adds_up(options: Store) -> None:
    keep = ArmPolicy()
    await options.update(keep, ("a", 3, 1), ("b", 2, 0))
    options.clock.now += 10 * 365 * 86400.0
    await options.update(keep, ("a", 1, 1))
    assert await options.read(keep, ("a", "b")) == {"a": (4.0, 2.0), "b": (2.0, 0.0)}
    raw = await options.raw()
    assert (raw["a|n"], raw["a|s"], raw["a|t"]) == (4.0, 2.0, options.clock.now)


async def test_half_life_decay_is_applied_on_write_and_on_read(options: Store) -> None:
    half_life = 600.0
    policy = ArmPolicy(half_life_seconds=half_life)
    start = options.clock.now
    await options.update(policy, ("a", 8, 4))
    # One half-life later, read without a write: the reader decays to its own now.
    options.clock.now = start + half_life
    assert await options.read(policy) == {"a": (4.0, 2.0)}
    # A write at that time decays the stored evidence first, then adds.
    await options.update(policy, ("a", 2, 2))
    raw = await options.raw()
    assert (raw["a|n"], raw["a|s"], raw["a|t"]) == (pytest.approx(6.0), pytest.approx(4.0), start + half_life)
    # Two more half-lives: a quarter remains; a fractional interval decays by 2^-x.
    options.clock.now = start + 3 * half_life
    n, s = (await options.read(policy))["a"]
    assert (n, s) == (pytest.approx(1.5), pytest.approx(1.0))
    options.clock.now = start + 1.5 * half_life
    n, _ = (await options.read(policy))["a"]
    assert n == pytest.approx(6.0 * math.pow(0.5, 0.5))


async def test_a_write_with_an_older_clock_does_not_move_time_back(options: Store) -> None:
    policy = ArmPolicy(half_life_seconds=100.0)
    await options.update(policy, ("a", 4, 0))
    latest = options.clock.now
    options.clock.now -= 50  # another replica whose clock is behind
    await options.update(policy, ("a", 4, 2))
    raw = await options.raw()
    assert (raw["a|n"], raw["a|s"], raw["a|t"]) == (8.0, 2.0, latest)


async def test_two_bucket_sliding_window(options: Store) -> None:
    window = 100.0
    policy = ArmPolicy(window_seconds=window)
    options.clock.now = 10_050.0  # halfway through bucket [10000, 10100)
    await options.update(policy, ("a", 10, 4))
    raw = await options.raw()
    assert (raw["a|wb"], raw["a|wn"], raw["a|ws"], raw["a|pn"]) == (10_000.0, 10.0, 4.0, 0.0)
    assert await options.read(policy) == {"a": (10.0, 4.0)}  # nothing before it: weight irrelevant

    # 75 s into the next bucket, with no write yet: the old bucket is weighted by the share of it
    # still inside the window ending now, 1 - 75/100.
    options.clock.now = 10_175.0
    assert await options.read(policy) == {"a": (pytest.approx(2.5), pytest.approx(1.0))}

    # A write in that bucket rolls the current bucket into "previous".
    await options.update(policy, ("a", 6, 3))
    raw = await options.raw()
    assert (raw["a|wb"], raw["a|wn"], raw["a|ws"], raw["a|pn"], raw["a|ps"]) == (
        10_100.0,
        6.0,
        3.0,
        10.0,
        4.0,
    )
    n, s = (await options.read(policy))["a"]
    assert (n, s) == (pytest.approx(6 + 10 * 0.25), pytest.approx(3 + 4 * 0.25))

    # Two windows without a write: everything has slid out.
    options.clock.now = 10_100.0 + 2 * window
    assert await options.read(policy) == {"a": (0.0, 0.0)}
    # A write after a gap of two buckets or more starts from nothing (no stale "previous").
    options.clock.now = 10_450.0
    await options.update(policy, ("a", 1, 1))
    raw = await options.raw()
    assert (raw["a|wb"], raw["a|wn"], raw["a|pn"], raw["a|ps"]) == (10_400.0, 1.0, 0.0, 0.0)
    assert await options.read(policy) == {"a": (1.0, 1.0)}
    # The all-time totals are kept beside the window.
    assert (raw["a|n"], raw["a|s"]) == (17.0, 8.0)


async def test_count_cap_rescales_evidence_keeping_the_take_up(options: Store) -> None:
    policy = ArmPolicy(count_cap=100.0)
    await options.update(policy, ("a", 150, 60))
    assert await options.read(policy) == {"a": (100.0, pytest.approx(40.0))}
    await options.update(policy, ("a", 10, 10))
    n, s = (await options.read(policy))["a"]
    assert (n, s) == (100.0, pytest.approx(50.0 * 100 / 110))
    # Below the cap nothing is rescaled.
    await options.update(ArmPolicy(count_cap=1000.0), ("b", 10, 5))
    assert (await options.read(policy, ("b",)))["b"] == (10.0, 5.0)


async def test_successes_never_exceed_impressions(options: Store) -> None:
    policy = ArmPolicy()
    await options.update(policy, ("a", 0, 1))  # a response whose impression was never counted
    assert await options.read(policy) == {"a": (1.0, 1.0)}


async def test_two_hundred_concurrent_updates_lose_nothing(options: Store) -> None:
    policy = ArmPolicy(half_life_seconds=3600.0, count_cap=10_000.0)

    async def one(i: int) -> None:
        # An impression on every call, an acceptance on every third, some with two offers at once.
        updates = [("a", 1.0, 1.0 if i % 3 == 0 else 0.0)]
        if i % 2:
            updates.append(("b", 1.0, 0.0))
        await options.update(policy, *updates)

    await asyncio.gather(*(one(i) for i in range(200)))
    raw = await options.raw()
    assert (raw["a|n"], raw["a|s"]) == (200.0, 67.0)
    assert (raw["b|n"], raw["b|s"]) == (100.0, 0.0)


def marking(offers: list[str], uuid: str, store: Any) -> Callable[[dict[str, str], Any], list[str]]:
    """An answer that accepts `offers`: the ones not accepted before are its fresh ones."""

    def answer(contact: dict[str, str], pipeline: Any) -> list[str]:
        fresh = [offer for offer in offers if f"accepted|{offer}" not in contact]
        store.queue_answer_marks(pipeline, uuid, fresh, contact)
        return fresh

    return answer


async def test_concurrent_responses_to_one_contact_count_once(options: Store) -> None:
    uuid = str(uuid_module.uuid4())
    key = redis_keys.contact(uuid)
    await options.redis.hset(key, mapping={"deployment": options.deployment, "offers": '["a","b"]'})
    await options.redis.expire(key, 60)
    answer = marking(["a", "b"], uuid, options.store)
    replies = await asyncio.gather(*(options.store.answer_contact(uuid, answer) for _ in range(50)))
    fresh = [reply for reply in replies if reply]
    assert fresh == [["a", "b"]]  # exactly one caller gets to learn
    assert all(reply == [] for reply in replies if not reply)


async def test_answers_mark_each_offer_once_and_a_gone_contact_is_none(options: Store) -> None:
    uuid = str(uuid_module.uuid4())
    key = redis_keys.contact(uuid)
    await options.redis.hset(key, mapping={"deployment": options.deployment})
    await options.redis.expire(key, 60)
    store = options.store
    assert await store.answer_contact(uuid, marking(["a", "b"], uuid, store)) == ["a", "b"]
    assert await store.answer_contact(uuid, marking(["a", "b"], uuid, store)) == []
    assert await store.answer_contact(uuid, marking(["b", "c"], uuid, store)) == ["c"]
    assert await store.answer_contact(uuid, marking([], uuid, store)) == []
    stored = {k.decode(): v.decode() for k, v in (await options.redis.hgetall(key)).items()}
    assert stored["responded"] == "1"
    assert {k for k in stored if k.startswith("accepted|")} == {"accepted|a", "accepted|b", "accepted|c"}
    assert await options.redis.ttl(key) > 0  # answering keeps the contact's expiry
    # A contact that is gone (expired or never made) is None, and answering it creates nothing.
    gone = str(uuid_module.uuid4())
    assert await store.answer_contact(gone, marking(["a"], gone, store)) is None
    assert not await options.redis.exists(redis_keys.contact(gone))


async def test_an_answer_that_fails_before_its_commit_writes_nothing(options: Store) -> None:
    """A refused or cancelled answer leaves no mark: its retry learns (no reward is lost)."""
    uuid = str(uuid_module.uuid4())
    key = redis_keys.contact(uuid)
    await options.redis.hset(key, mapping={"deployment": options.deployment})
    await options.redis.expire(key, 60)
    store = options.store

    def refused(contact: dict[str, str], pipeline: Any) -> None:
        store.queue_answer_marks(pipeline, uuid, ["a"], contact)
        raise InvalidArgument("refused after queueing", field="reward")

    with pytest.raises(InvalidArgument):
        await store.answer_contact(uuid, refused)
    assert await store.answer_contact(uuid, marking(["a"], uuid, store)) == ["a"]


async def test_linear_model_updates_accumulate_a_and_b(options: Store) -> None:
    key = redis_keys.linear_model(options.deployment, "0", "a")
    rows = [([1.0, 0.5, 2.0], 1.0), ([1.0, -1.0, 0.0], 0.0), ([1.0, 3.0, 1.5], 0.25)]
    for vector, reward in rows:
        pipeline = options.store.pipeline()
        options.store.linear.queue_update(pipeline, options.scope, "a", vector, reward)
        await options.store.send(pipeline)
    stored = await options.redis.hgetall(key)
    a = np.array(json.loads(stored[b"a"])).reshape(3, 3)
    b = np.array(json.loads(stored[b"b"]))
    x = np.array([vector for vector, _ in rows])
    y = np.array([reward for _, reward in rows])
    np.testing.assert_allclose(a, x.T @ x)
    np.testing.assert_allclose(b, x.T @ y)
    statistics = await options.store.read_statistics("linear", options.scope, ["a", "b"], ArmPolicy())
    assert set(statistics.linear) == {"a"}
    np.testing.assert_allclose(statistics.linear["a"].a, x.T @ x)

    # The deployment's features change (d = 2): the old model is replaced, not mixed in.
    pipeline = options.store.pipeline()
    options.store.linear.queue_update(pipeline, options.scope, "a", [1.0, 4.0], 1.0)
    await options.store.send(pipeline)
    stored = await options.redis.hgetall(key)
    assert json.loads(stored[b"a"]) == [1, 4, 4, 16]
    assert json.loads(stored[b"b"]) == [1, 4]


def test_parse_arms_skips_fields_that_are_not_numbers() -> None:
    raw = {b"a|n": b"10", b"a|s": b"3", b"a|junk": b"not-a-number", "b|n": "2", "b|s": "5"}
    arms = parse_arms(raw, ArmPolicy(), now=0.0)
    assert (arms["a"].impressions, arms["a"].successes) == (10.0, 3.0)
    assert (arms["b"].impressions, arms["b"].successes) == (2.0, 2.0)  # successes capped at impressions


async def test_the_generation_is_read_from_redis_and_cached(options: Store) -> None:
    assert await options.store.generation(options.deployment) == "0"
    await options.redis.set(redis_keys.options_generation(options.deployment), "7")
    other = OptionsStore(options.redis)  # a fresh replica reads the switch at once
    assert await other.generation(options.deployment) == "7"


async def test_requests_that_find_the_generation_stale_together_read_it_once(
    options: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica's cached generation expires under load: the requests in flight then share one
    read (each taking a connection for its own GET could exhaust the pool), and one cancelled
    waiter does not cancel the read for the others."""
    await options.redis.set(redis_keys.options_generation(options.deployment), "3")
    fresh = OptionsStore(options.redis)
    real_get = options.redis.get
    reads: list[str] = []
    reading, release = asyncio.Event(), asyncio.Event()

    async def held_get(key: str) -> Any:  # the GET waits until every waiter is in
        reads.append(key)
        reading.set()
        await release.wait()
        return await real_get(key)

    monkeypatch.setattr(options.redis, "get", held_get)
    waiters = [asyncio.ensure_future(fresh.generation(options.deployment)) for _ in range(100)]
    # The read starts after every waiter's first step (tasks run in the order they were made).
    await asyncio.wait_for(reading.wait(), timeout=10)
    waiters[0].cancel()
    release.set()
    results = await asyncio.gather(*waiters[1:])
    assert results == ["3"] * 99
    assert reads == [redis_keys.options_generation(options.deployment)]
    assert waiters[0].cancelled()


def _reference_parse_arms(raw: dict[str, str], policy: ArmPolicy, now: float) -> dict[str, tuple[float, ...]]:
    """The arm decay rules, offer by offer (the Lua scripts apply the same ones when writing)."""
    fields: dict[str, dict[str, float]] = {}
    for key, value in raw.items():
        offer, _, part = key.rpartition("|")
        fields.setdefault(offer, {})[part] = float(value)
    arms = {}
    for offer, values in fields.items():
        if policy.window_seconds > 0 and "wb" in values:
            window = policy.window_seconds
            elapsed = now - values["wb"]
            if elapsed >= 2 * window:
                n = s = 0.0
            elif elapsed >= window:
                weight = max(0.0, 1.0 - (elapsed - window) / window)
                n, s = values.get("wn", 0.0) * weight, values.get("ws", 0.0) * weight
            else:
                weight = max(0.0, 1.0 - elapsed / window)
                n = values.get("wn", 0.0) + values.get("pn", 0.0) * weight
                s = values.get("ws", 0.0) + values.get("ps", 0.0) * weight
        else:
            n, s = values.get("n", 0.0), values.get("s", 0.0)
            if policy.half_life_seconds > 0:
                factor = 0.5 ** (max(now - values.get("t", now), 0.0) / policy.half_life_seconds)
                n, s = n * factor, s * factor
        arms[offer] = (n, min(s, n), values.get("pa", 0.0), values.get("pb", 0.0))
    return arms


@settings(max_examples=200, deadline=None)
@given(
    hashes=st.dictionaries(
        st.tuples(
            st.sampled_from(["a", "b", "c|x", "dé"]),
            st.sampled_from(["n", "s", "t", "pa", "pb", "wb", "wn", "ws", "pn", "ps", "other"]),
        ),
        st.floats(min_value=0, max_value=1e6, allow_nan=False),
        max_size=30,
    ),
    half_life=st.sampled_from([0.0, 60.0, 3600.0]),
    window=st.sampled_from([0.0, 30.0, 600.0]),
    now=st.floats(min_value=0, max_value=2e6, allow_nan=False),
)
def test_the_vectorised_parse_applies_the_decay_rules_of_every_arm(
    hashes: dict[tuple[str, str], float], half_life: float, window: float, now: float
) -> None:
    raw = {f"{offer}|{part}": repr(value) for (offer, part), value in hashes.items()}
    policy = ArmPolicy(half_life_seconds=half_life, window_seconds=window)
    parsed = parse_arms({key.encode(): value.encode() for key, value in raw.items()}, policy, now)
    expected = _reference_parse_arms(raw, policy, now)
    assert set(parsed) == set(expected)
    for offer, values in expected.items():
        arm = parsed[offer]
        got = (arm.impressions, arm.successes, arm.prior_alpha, arm.prior_beta)
        assert got == pytest.approx(values, rel=1e-9, abs=1e-9), offer
    offers = [*expected, "unknown"]
    n, s, pa, pb = parsed.columns(offers)
    assert n[-1] == s[-1] == pa[-1] == pb[-1] == 0.0
    assert [parsed[o].impressions for o in expected] == n[:-1].tolist()


@settings(max_examples=100, deadline=None)
@given(
    half_life=st.sampled_from([0.0, 8.0, 604800.0]),
    window=st.sampled_from([0.0, 30.0, 86400.0]),
    start=st.floats(min_value=1e6, max_value=2e6, allow_nan=False),
    steps=st.lists(st.floats(min_value=-1.0, max_value=1.0, allow_nan=False), min_size=1, max_size=8),
)
def test_a_decayed_table_serves_again_only_while_a_fresh_one_would_be_the_same(
    half_life: float, window: float, start: float, steps: list[float]
) -> None:
    """ArmFields.at keeps its last table per policy: while `now` moves less than DECAY_UNCHANGED of
    the policy's shortest time scale, a fresh decay would differ by at most that fraction of the counts."""
    raw = {"a|n": "40", "a|s": "7", "a|t": repr(start - 5000.0), "a|wb": repr(start - 40000.0)}
    raw |= {"a|wn": "12", "a|ws": "3", "a|pn": "20", "a|ps": "4", "b|n": "3", "b|t": repr(start - 10.0)}
    policy = ArmPolicy(half_life_seconds=half_life, window_seconds=window)
    fields = ArmFields.read(raw)
    now = start
    for step in steps:
        now += step
        table = fields.at(policy, now)
        fresh = ArmFields.read(raw).at(policy, now)
        for offer in ("a", "b"):
            got, exact = table[offer], fresh[offer]
            for part in ("impressions", "successes"):
                assert getattr(got, part) == pytest.approx(
                    getattr(exact, part), rel=0, abs=DECAY_UNCHANGED * 60
                )
        if half_life == window == 0.0:
            assert table is fields.at(policy, now + 1e6)  # nothing decays: one table for ever
    assert fields.at(ArmPolicy(half_life_seconds=1.0), now) is not fields.at(policy, now)  # one per policy


async def test_a_replica_reuses_a_segments_statistics_until_a_response_or_their_age(
    options: Store, redis_url: str
) -> None:
    """With statistics_max_age, a replica reads a segment's arm hash once per max age; an impression
    (Invoke) waits for the next read, a response (Respond, on any replica) is seen at once."""
    keep = ArmPolicy()
    other_client = Redis.from_url(redis_url)
    caching = Store(
        OptionsStore(other_client, clock=options.clock, statistics_max_age=3600.0),
        other_client,
        options.clock,
        options.deployment,
    )
    subscribed = asyncio.Event()
    feed = asyncio.create_task(caching.store.follow_updates(on_subscribed=subscribed.set))
    try:
        await asyncio.wait_for(subscribed.wait(), 10)
        await options.update(keep, ("a", 3, 0))
        assert await caching.read(keep) == {"a": (3.0, 0.0)}
        await options.update(keep, ("a", 2, 0))  # impressions on another replica
        assert await caching.read(keep) == {"a": (3.0, 0.0)}  # the copy, until it ages out
        await options.update(keep, ("a", 0, 1))  # a response on another replica: published

        async def learned() -> dict[str, tuple[float, float]] | None:
            seen = await caching.read(keep)
            return seen if seen == {"a": (5.0, 1.0)} else None

        await eventually(learned, within=5, what="the response reached the caching replica")
        # Its own response drops its copy at once, before any message comes back.
        await caching.update(keep, ("a", 0, 1))
        assert await caching.read(keep) == {"a": (5.0, 2.0)}
        # An interrupted feed drops every copy.
        await options.update(keep, ("a", 1, 0))
        caching.store.arms.forget()
        assert await caching.read(keep) == {"a": (6.0, 2.0)}
    finally:
        feed.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feed
        await other_client.aclose()


async def test_a_zero_max_age_reads_redis_on_every_invoke(options: Store) -> None:
    keep = ArmPolicy()
    await options.update(keep, ("a", 1, 0))
    assert await options.read(keep) == {"a": (1.0, 0.0)}
    await options.redis.hset(options.key, "a|n", "7")  # behind the store's back
    assert await options.read(keep) == {"a": (7.0, 0.0)}


async def test_a_contact_is_kept_with_its_expiry_in_one_command_even_after_redis_lost_its_scripts(
    options: Store,
) -> None:
    store = options.store
    for attempt in range(2):
        uuid = str(uuid_module.uuid4())
        pipeline = store.pipeline()
        store.queue_contact(
            pipeline, uuid, {"deployment": options.deployment, "time": 1.5, "revision": 3}, 3600
        )
        assert len(pipeline.command_stack) == 1
        await store.send(pipeline)
        assert await store.read_contact(uuid) == {
            "deployment": options.deployment,
            "time": "1.5",
            "revision": "3",
        }
        assert 3590 < await options.redis.ttl(redis_keys.contact(uuid)) <= 3600
        if attempt == 0:
            await options.redis.script_flush()  # as after a Redis restart


async def test_a_contact_that_is_not_a_hash_fails_the_answer_and_nothing_is_written(options: Store) -> None:
    uuid = str(uuid_module.uuid4())
    key = redis_keys.contact(uuid)
    await options.redis.set(key, "not a hash")

    def answer(contact: dict[str, str], pipeline: Any) -> None:
        raise AssertionError("never called: the read failed")

    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await options.store.answer_contact(uuid, answer)
    assert await options.redis.get(key) == b"not a hash"


async def test_a_failing_command_fails_the_answer_and_the_commands_after_it_do_not_run(
    options: Store,
) -> None:
    """As in MULTI/EXEC: what ran before the failing command stays, nothing after it runs."""
    uuid = str(uuid_module.uuid4())
    key = redis_keys.contact(uuid)
    await options.redis.hset(key, mapping={"deployment": options.deployment, "offers": '["a"]'})
    store = options.store

    def failing(contact: dict[str, str], pipeline: Any) -> None:
        pipeline.hset(key, "first", "1")
        pipeline.incr(key)  # WRONGTYPE: the contact is a hash
        pipeline.hset(key, "after", "1")

    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await store.answer_contact(uuid, failing)
    stored = await options.redis.hgetall(key)
    assert b"first" in stored
    assert b"after" not in stored


class HeldReplies(Connection):
    """A connection whose reads wait, while `hold` is set, until `release` is set."""

    hold = False
    holding = asyncio.Event()
    release = asyncio.Event()

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if HeldReplies.hold:
            HeldReplies.holding.set()
            await HeldReplies.release.wait()
        return await super().read_response(*args, **kwargs)


async def test_an_answer_cancelled_while_its_commit_is_out_is_learned_once(
    redis_url: str,
) -> None:
    """The commit's batch lands whether or not the request that queued it still waits: the retry
    finds the offer answered (not learned twice), and the next answer is served as usual."""
    HeldReplies.hold, HeldReplies.holding, HeldReplies.release = False, asyncio.Event(), asyncio.Event()
    client = Redis.from_url(redis_url, connection_class=HeldReplies)
    uuid = str(uuid_module.uuid4())
    key = redis_keys.contact(uuid)
    await client.hset(key, mapping={"deployment": "d", "offers": '["a"]'})
    store = OptionsStore(client)
    try:

        def answer(contact: dict[str, str], pipeline: Any) -> list[str]:
            HeldReplies.hold = True  # the commit's replies wait
            return marking(["a"], uuid, store)(contact, pipeline)

        task = asyncio.create_task(store.answer_contact(uuid, answer))
        await HeldReplies.holding.wait()
        HeldReplies.hold = False
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        HeldReplies.release.set()  # the batch lands
        assert await store.answer_contact(uuid, marking(["a"], uuid, store)) == []  # committed once
        assert await store.answer_contact(uuid, marking(["b"], uuid, store)) == ["b"]
    finally:
        HeldReplies.release.set()
        await client.delete(key)
        await client.aclose()
