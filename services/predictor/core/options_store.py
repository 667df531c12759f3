"""The predictor's side of Redis: the statistics stores of every kind (statistics_stores.py), the
live options generation of each deployment, the customers' online features, contacts (kept for
the Respond join) and the decision log stream (in the format of libs/common/decision_log.py).
Writes are queued on a pipeline the caller sends, so one request's writes take one round trip, and
the pipelines of concurrent requests go to Redis together (libs/common/redis_batch.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from redis.asyncio import Redis

from libs.common import decision_log, redis_keys
from libs.common.errors import Unavailable
from libs.common.redis_batch import RedisBatch, queue_guarded, queue_script
from libs.policy.statistics import ArmPolicy, Statistics, StatisticsKind
from services.predictor.core.statistics_stores import (
    ArmStatistics,
    LinearModels,
    NaiveBayesCounts,
    Scope,
    StatisticsStore,
)

DECISION_LOG_MAX_LENGTH = 1_000_000
GENERATION_CACHE_SECONDS = 1.0

# KEYS[1] = contact hash. ARGV: seconds to keep it, then field/value pairs. The contact and its
# expiry in one command: no contact can exist without one.
KEEP_CONTACT = """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return redis.call('EXPIRE', KEYS[1], ARGV[1])
"""

Answer = TypeVar("Answer")

# The first element of a `ScriptedAnswer`'s reply: no contact, the contact left to Python, answered.
NO_CONTACT, LEFT_TO_PYTHON, ANSWERED_IN_REDIS = 0, 1, 2


@dataclass(frozen=True)
class ScriptedAnswer(Generic[Answer]):
    """A script that reads a contact and may answer it in Redis, in the same round trip: queued in
    place of the read (`queue(pipeline, contact key)`), it replies [NO_CONTACT], [LEFT_TO_PYTHON,
    the contact's fields and values] or [ANSWERED_IN_REDIS, ...], which `result` reads."""

    queue: Callable[[Any, str], None]
    result: Callable[[Sequence[Any]], Answer]


# Answers to one contact that may race (a client retry, Envoy's retry on a reset): an answer is
# re-read and re-queued when another committed in between, this many times at most.
ANSWER_ATTEMPTS = 8


class OptionsStore:
    def __init__(
        self, redis: Redis, clock: Callable[[], float] = time.time, statistics_max_age: float = 0.0
    ) -> None:
        self._redis = redis
        self._batch = RedisBatch(redis)
        self._clock = clock
        self._generations: dict[str, tuple[float, str]] = {}
        self._generation_reads: dict[str, asyncio.Future[str]] = {}
        self.arms = ArmStatistics(redis, statistics_max_age)
        self.naive_bayes = NaiveBayesCounts()
        self.linear = LinearModels()
        self.statistics: dict[StatisticsKind, StatisticsStore] = {
            store.kind: store for store in (self.arms, self.naive_bayes, self.linear)
        }

    @property
    def redis(self) -> Redis:
        return self._redis

    def pipeline(self) -> Any:
        """A pipeline (no transaction) to queue a request's commands on; `send` sends it."""
        return self._batch.pipeline()

    @property
    def batched_round_trips(self) -> int:
        """Round trips of the coalesced batches so far (commands sent alone not included)."""
        return self._batch.round_trips

    async def send(self, pipeline: Any) -> list[Any]:
        """The replies to what the pipeline holds, sent with the commands of concurrent requests."""
        return await self._batch.send(pipeline)

    @staticmethod
    def queue_features(pipeline: Any, feature_view: str, entity: str) -> None:
        """The entity's online features (a hash; empty when there are none)."""
        pipeline.hgetall(redis_keys.online_features(feature_view, entity))

    @staticmethod
    def queue_whitelist(pipeline: Any, feature_view: str, entity: str, column: str) -> None:
        """The entity's whitelist entry: one column of its online features (None when it has none)."""
        pipeline.hget(redis_keys.online_features(feature_view, entity), column)

    async def read_features(self, feature_view: str, entity: str) -> dict[Any, Any]:
        """The same, sent on its own (with the commands of concurrent requests)."""
        pipeline = self.pipeline()
        self.queue_features(pipeline, feature_view, entity)
        (raw,) = await self.send(pipeline)
        return dict(raw)

    async def feature_view_columns(self, feature_view: str) -> list[str] | None:
        """The features ingest materialized into a view; None when it never materialized one."""
        value = await self._redis.get(redis_keys.feature_view_columns(feature_view))
        return [str(name) for name in json.loads(value)] if value is not None else None

    @staticmethod
    def queue_contact(pipeline: Any, uuid: str, fields: Mapping[str, Any], ttl_seconds: float) -> None:
        """Keep what Respond will need of this Invoke for `ttl_seconds`."""
        pairs = [item for field_and_value in fields.items() for item in field_and_value]
        queue_script(pipeline, KEEP_CONTACT, [redis_keys.contact(uuid)], [int(ttl_seconds), *pairs])

    async def read_contact(self, uuid: str) -> dict[str, str] | None:
        """An Invoke's contact (None: unknown, or older than its reward window)."""
        raw = await self._redis.hgetall(redis_keys.contact(uuid))
        return {_text(k): _text(v) for k, v in raw.items()} if raw else None

    @staticmethod
    def queue_log(pipeline: Any, record: decision_log.Contact | decision_log.Response) -> None:
        """Append a record to the decision log stream (capped at DECISION_LOG_MAX_LENGTH)."""
        entry: dict[Any, Any] = record.encode()
        pipeline.xadd(redis_keys.DECISION_STREAM, entry, maxlen=DECISION_LOG_MAX_LENGTH, approximate=True)

    def now(self) -> float:
        return float(self._clock())

    async def generation(self, deployment: str) -> str:
        """The live options generation (ingest switches it atomically); cached for a second."""
        cached = self._generations.get(deployment)
        now = time.monotonic()
        if cached is not None and now - cached[0] < GENERATION_CACHE_SECONDS:
            return cached[1]
        # One read however many requests find the copy stale at once (not one connection each).
        reading = self._generation_reads.get(deployment)
        if reading is None:
            reading = asyncio.ensure_future(self._read_generation(deployment, now))
            self._generation_reads[deployment] = reading
            reading.add_done_callback(lambda _: self._generation_reads.pop(deployment, None))
        return await asyncio.shield(reading)  # a waiter cancelled does not cancel the others' read

    async def _read_generation(self, deployment: str, now: float) -> str:
        value = await self._redis.get(redis_keys.options_generation(deployment))
        generation = _text(value) if value is not None else "0"
        self._generations[deployment] = (now, generation)
        return generation

    async def read_statistics(
        self, kind: StatisticsKind, scope: Scope, offers: Sequence[str], policy: ArmPolicy
    ) -> Statistics:
        """One kind of statistics for these offers, in one round trip (none for a kept copy)."""
        store, now = self.statistics[kind], self.now()
        kept = store.kept(scope, policy, now)
        if kept is not None:
            return kept
        pipeline = self.pipeline()
        reader = store.queue_read(pipeline, scope, offers, policy, now)
        return reader(iter(await self.send(pipeline)))

    async def follow_updates(self, on_subscribed: Callable[[], None] | None = None) -> None:
        """Until cancelled: keep this replica's copies of arm statistics in step with every response."""
        await self.arms.follow_updates(on_subscribed)

    async def answer_contact(
        self,
        uuid: str,
        answer: Callable[[dict[str, str], Any], Answer],
        in_redis: ScriptedAnswer[Answer] | None = None,
    ) -> Answer | None:
        """Answer a contact atomically: `answer(contact, pipeline)` reads the contact as it is now and
        queues everything answering it writes (the learning, the log entry, then the marks on the
        contact), and it runs in one script, only while the contact is as it was read (as in a
        transaction, a command that fails stops the ones after it, so the marks come last and a
        failed answer leaves its contact open for the retry). Two round trips, each in a batch with
        the commands of concurrent requests: the read, then the guarded script
        (`redis_batch.queue_guarded`). A contact only gains fields (its answer marks), so "as it was
        read" is "with as many fields": when another answer committed in between, this one is read
        and queued again. So a call cancelled or failed before the commit leaves no trace and its
        retry does the whole work, and one after it finds the offers answered: a response is learned
        exactly once. With `in_redis`, a script reads the contact and may answer it in that one
        round trip; when it leaves the answer to `answer`, its reply is the read. None when the
        contact is gone (unknown, or older than its reward window)."""
        key = redis_keys.contact(uuid)
        for _ in range(ANSWER_ATTEMPTS):
            read = self.pipeline()
            if in_redis is not None:
                in_redis.queue(read, key)
            else:
                read.hgetall(key)
            (reply,) = await self.send(read)
            if in_redis is not None:
                if int(reply[0]) == ANSWERED_IN_REDIS:
                    return in_redis.result(reply)
                raw = _pairs(reply[1]) if int(reply[0]) == LEFT_TO_PYTHON else {}
            else:
                raw = reply
            if not raw:
                return None
            writes = self.pipeline()  # holds the answer's commands; sent inside the guard
            result = answer({_text(k): _text(v) for k, v in raw.items()}, writes)
            commit = self.pipeline()
            queue_guarded(commit, key, len(raw), writes.command_stack)
            (committed,) = await self.send(commit)
            if committed:
                return result
        raise Unavailable(f"the contact '{uuid}' was answered concurrently {ANSWER_ATTEMPTS} times; retry")

    @staticmethod
    def queue_answer_marks(
        pipeline: Any,
        uuid: str,
        offers: Sequence[str],
        contact: Mapping[str, str],
        more: Mapping[str, str] | None = None,
    ) -> None:
        """The contact has been answered, and these offers accepted (each learned once); `more`
        marks anything else learned once (a router's reward). Marks are only ever added, never
        removed or rewritten: the guard of `answer_contact` counts the contact's fields, so a new
        mark restarts the other answers racing for it and a duplicate, which adds none, restarts
        nothing."""
        marks = {f"accepted|{offer}": "1" for offer in offers} | dict(more or {})
        if contact.get("responded") != "1":
            marks["responded"] = "1"
        if marks:
            pipeline.hset(redis_keys.contact(uuid), mapping=marks)


def _pairs(flat: Sequence[Any]) -> dict[Any, Any]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
