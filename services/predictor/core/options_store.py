"""The predictor's side of Redis: the statistics stores of every kind (statistics_stores.py), the
live options generation of each deployment, the customers' online features, contacts (kept for
the Respond join) and the decision log stream (in the format of libs/common/decision_log.py).
Writes are queued on a pipeline the caller sends, so one request's writes take one round trip, and
the pipelines of concurrent requests go to Redis together (libs/common/redis_batch.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from libs.common import decision_log, redis_keys
from libs.common.errors import Unavailable
from libs.common.redis_batch import RedisBatch, exchange, queue_script
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

# KEYS[1] = contact hash. ARGV: offers the response credits. Marks each offer answered once and
# returns the ones marked now (a repeated response learns nothing twice); also marks the contact.
Answer = TypeVar("Answer")

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
        self, uuid: str, answer: Callable[[dict[str, str], Any], Answer]
    ) -> Answer | None:
        """Answer a contact atomically: `answer(contact, pipeline)` reads the contact as it is now and
        queues everything answering it writes (the marks on the contact, the learning, the log
        entry), and all of it is committed in one MULTI/EXEC or none of it is: two round trips on a
        connection of the answer's own, the WATCH and the read in one, the transaction in the other.
        So a call cancelled or failed anywhere before the commit leaves no trace and its retry does
        the whole work, and one after it finds the offers answered: a response is learned exactly
        once. When another answer to the same contact commits in between (WATCH), this one is read
        and queued again. None when the contact is gone (unknown, or older than its reward window)."""
        key = redis_keys.contact(uuid)
        for _ in range(ANSWER_ATTEMPTS):
            async with _WatchedTransaction(self._redis) as transaction:
                raw = await transaction.watch_and_read(key)
                if not raw:
                    return None
                queue = self._redis.pipeline(transaction=False)  # holds the commands; never sent itself
                result = answer({_text(k): _text(v) for k, v in raw.items()}, queue)
                if await transaction.commit(queue.command_stack):
                    return result
        raise Unavailable(f"the contact '{uuid}' was answered concurrently {ANSWER_ATTEMPTS} times; retry")

    @staticmethod
    def queue_answer_marks(
        pipeline: Any, uuid: str, offers: Sequence[str], contact: Mapping[str, str]
    ) -> None:
        """The contact has been answered, and these offers accepted (each learned once). Nothing is
        written when nothing changes: every write to the contact restarts the other answers racing
        for it (WATCH), so a burst of duplicates must not write."""
        marks = {f"accepted|{offer}": "1" for offer in offers}
        if contact.get("responded") != "1":
            marks["responded"] = "1"
        if marks:
            pipeline.hset(redis_keys.contact(uuid), mapping=marks)


class _WatchedTransaction:
    """WATCH, read, then MULTI/EXEC, written and read directly on a connection taken from the pool
    for the transaction (redis-py's transaction pipeline cost about as much CPU as the rest of a
    Respond). The connection goes back to the pool watching nothing and with no reply left unread:
    EXEC ends the WATCH, an answer that stops before it sends UNWATCH, and a connection stopped
    between a write and its last reply (a dropped connection, a timeout, a cancelled call) is closed."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._connection: Any = None
        self._watching = False
        self._replies_pending = False  # written, and not every reply read

    async def __aenter__(self) -> _WatchedTransaction:
        return self

    async def watch_and_read(self, key: str) -> dict[Any, Any]:
        """WATCH the key and read its hash, in one write. A connection found dead is replaced once:
        both commands only read, so sending them again is safe."""
        pool = self._redis.connection_pool
        for attempt in range(2):
            connection = self._connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                watched, raw = await self._exchange([("WATCH", key), ("HGETALL", key)])
            except RedisConnectionError:
                # A dropped connection has lost its WATCH.
                self._connection, self._watching, self._replies_pending = None, False, False
                await connection.disconnect()
                await pool.release(connection)
                if attempt:
                    raise
                continue
            self._watching = not isinstance(watched, Exception)
            for reply in (watched, raw):
                if isinstance(reply, Exception):
                    raise reply
            return dict(raw)  # redis-py's parsing made it a dict
        raise AssertionError("unreachable")

    async def commit(self, commands: Sequence[tuple[tuple[Any, ...], Mapping[str, Any]]]) -> bool:
        """MULTI, the commands, EXEC: True once committed, False when the watched key changed
        (nothing was written). Raises the first command's error (nothing was written either when
        it was refused as it was queued: EXEC then aborts)."""
        # A queued command's reply is QUEUED, not its own: the replies are taken as they come.
        replies = await self._exchange([("MULTI",), *(args for args, _ in commands), ("EXEC",)], parsed=False)
        self._watching = False  # EXEC ends the WATCH, whatever it answers
        *queued, executed = replies
        for reply in queued:
            if isinstance(reply, Exception):
                raise reply
        if isinstance(executed, Exception):
            raise executed
        if executed is None:
            return False
        for reply in executed:
            if isinstance(reply, Exception):
                raise reply
        return True

    async def _exchange(self, commands: list[tuple[Any, ...]], parsed: bool = True) -> list[Any]:
        self._replies_pending = True
        replies = await exchange(
            self._redis, self._connection, [(command, {}) for command in commands], parsed
        )
        self._replies_pending = False
        return replies

    async def __aexit__(self, *_: object) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            if self._replies_pending:
                await connection.disconnect(nowait=True)
            elif self._watching:
                await connection.send_command("UNWATCH")
                await connection.read_response()
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        finally:
            await self._redis.connection_pool.release(connection)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
