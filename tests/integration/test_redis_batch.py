"""Coalesced round trips (libs/common/redis_batch.py) on a real Redis: concurrent requests share a
round trip and each gets its own replies and its own errors; scripts go by SHA and run exactly once
when Redis has lost them; a transaction's scripts go with their body."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from libs.common.redis_batch import RedisBatch, pack_commands, queue_guarded, queue_script
from libs.stack.processes import free_port
from tests.conftest import running_redis

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

INCREMENT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


class SignallingBatch(RedisBatch):
    """A batch that says when a round trip starts, and when `waiting_for` requests are queued."""

    def __init__(self, redis: Redis, waiting_for: int) -> None:
        super().__init__(redis)
        self.out = asyncio.Event()
        self.queued = asyncio.Event()
        self._waiting_for = waiting_for

    async def _execute(self, commands: list[Any]) -> list[Any]:
        self.out.set()
        return await super()._execute(commands)

    def _flush(self) -> None:
        if len(self._waiting) >= self._waiting_for:
            self.queued.set()
        super()._flush()


async def hold_a_batch_out(batch: SignallingBatch) -> asyncio.Task[list[Any]]:
    """A first batch that waits in Redis (BLPOP) until `wake` gets an item: it is out for as long as
    the test wants, so what comes meanwhile cannot leave before it lands."""
    pipeline = batch.pipeline()
    pipeline.blpop(["wake"], 10)
    first = asyncio.create_task(batch.send(pipeline))
    await batch.out.wait()
    return first


async def wake(redis_url: str) -> None:
    other = Redis.from_url(redis_url)
    try:
        await other.rpush("wake", "now")
    finally:
        await other.aclose()


async def test_concurrent_requests_share_one_round_trip_and_get_their_own_replies(
    client: Redis,
) -> None:
    batch = RedisBatch(client)

    async def request(index: int) -> list[Any]:
        pipeline = batch.pipeline()
        pipeline.set(f"k{index}", index)
        pipeline.incrby(f"k{index}", 1000)
        pipeline.get(f"k{index}")
        return await batch.send(pipeline)

    replies = await asyncio.gather(*(request(i) for i in range(25)))

    assert batch.round_trips == 1
    assert replies == [[True, 1000 + i, str(1000 + i).encode()] for i in range(25)]


async def test_a_failing_command_fails_only_the_request_that_sent_it(client: Redis) -> None:
    await client.set("a-string", "x")
    batch = RedisBatch(client)

    async def wrong_type() -> list[Any]:
        pipeline = batch.pipeline()
        pipeline.hset("a-string", "field", "1")  # WRONGTYPE: the key holds a string
        return await batch.send(pipeline)

    async def fine() -> list[Any]:
        pipeline = batch.pipeline()
        pipeline.set("other", "1")
        return await batch.send(pipeline)

    failed, succeeded = await asyncio.gather(wrong_type(), fine(), return_exceptions=True)

    assert isinstance(failed, ResponseError)
    assert "WRONGTYPE" in str(failed)
    assert succeeded == [True]
    assert batch.round_trips == 1


async def test_a_script_redis_has_lost_runs_exactly_once(client: Redis) -> None:
    batch = RedisBatch(client)

    async def increment() -> int:
        pipeline = batch.pipeline()
        queue_script(pipeline, INCREMENT, ["counter"], [1])
        assert pipeline.command_stack[0][0][0] == "EVALSHA"
        (value,) = await batch.send(pipeline)
        return int(value)

    assert await increment() == 1  # a new Redis knows no script: sent again with its body
    assert await increment() == 2  # now by SHA alone
    await client.script_flush()  # as after a restart
    assert await increment() == 3
    assert int(await client.get("counter") or 0) == 3


async def test_other_pipelines_send_scripts_with_their_body(client: Redis) -> None:
    # Inside MULTI/EXEC a NOSCRIPT would not stop the rest of the transaction; a pipeline sent on
    # its own has nothing that would send the body again.
    await client.script_flush()
    for transaction in (True, False):
        async with client.pipeline(transaction=transaction) as pipeline:
            queue_script(pipeline, INCREMENT, ["counter"], [5])
            assert pipeline.command_stack[0][0][0] == "EVAL"
            assert await pipeline.execute() == [5 if transaction else 10]


async def test_a_connection_error_fails_every_request_of_the_batch() -> None:
    client = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    batch = RedisBatch(client)

    async def request(index: int) -> list[Any]:
        pipeline = batch.pipeline()
        pipeline.get(f"k{index}")
        return await batch.send(pipeline)

    try:
        results = await asyncio.gather(*(request(i) for i in range(3)), return_exceptions=True)
    finally:
        await client.aclose()
    assert all(isinstance(result, RedisConnectionError) for result in results), results
    assert len({id(result) for result in results}) == 3  # each request its own exception


async def test_a_request_cancelled_before_its_batch_leaves_sends_nothing(
    client: Redis, redis_url: str
) -> None:
    batch = SignallingBatch(client, waiting_for=3)

    async def request(index: int) -> list[Any]:
        pipeline = batch.pipeline()
        pipeline.set(f"k{index}", index)
        return await batch.send(pipeline)

    first = await hold_a_batch_out(batch)
    tasks = [asyncio.create_task(request(i)) for i in range(3)]
    await batch.queued.wait()  # the three wait for the next batch, which has not left
    tasks[1].cancel()
    await wake(redis_url)
    assert await first == [(b"wake", b"now")]
    results = await asyncio.gather(*tasks, return_exceptions=True)

    assert results[0] == [True]
    assert results[2] == [True]
    assert isinstance(results[1], asyncio.CancelledError)
    assert await client.get("k1") is None  # nothing was acknowledged to it, nothing was written


async def test_an_argument_that_does_not_encode_fails_only_its_own_request(client: Redis) -> None:
    batch = RedisBatch(client)

    async def request(key: str, value: Any) -> list[Any]:
        pipeline = batch.pipeline()
        pipeline.set(key, value)
        return await batch.send(pipeline)

    bad, good = await asyncio.gather(request("bad", None), request("good", "1"), return_exceptions=True)

    assert isinstance(bad, DataError)
    assert good == [True]
    assert await client.get("good") == b"1"


async def test_requests_that_come_while_a_batch_is_out_go_together_in_the_next(
    client: Redis, redis_url: str
) -> None:
    batch = SignallingBatch(client, waiting_for=10)

    async def request() -> list[Any]:
        pipeline = batch.pipeline()
        pipeline.incr("n")
        return await batch.send(pipeline)

    first = await hold_a_batch_out(batch)
    later = [asyncio.create_task(request()) for _ in range(10)]
    await batch.queued.wait()  # every later request has queued its command
    assert batch.round_trips == 1
    await wake(redis_url)

    assert await first == [(b"wake", b"now")]
    assert sorted(value for [value] in await asyncio.gather(*later)) == list(range(1, 11))
    assert batch.round_trips == 2  # the ten went in one batch


async def test_a_batch_whose_connection_was_dropped_goes_again_on_a_new_one(
    client: Redis, redis_url: str
) -> None:
    named = Redis.from_url(redis_url, client_name="batch-under-test")
    batch = RedisBatch(named)

    async def request() -> list[Any]:
        pipeline = batch.pipeline()
        pipeline.incr("n")
        return await batch.send(pipeline)

    try:
        assert await request() == [1]
        killed = 0
        for row in await client.client_list():
            if row["name"] == "batch-under-test":
                killed += await client.client_kill_filter(_id=row["id"])  # as a Redis restart would
        assert killed == 1
        assert await request() == [2]  # sent once more, on a new connection; run once
    finally:
        await named.aclose()
    assert await client.get("n") == b"2"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["HSET", "EVALSHA", "XADD", b"HGETALL"]),
            st.lists(
                st.one_of(
                    st.text(max_size=20),
                    st.binary(max_size=20),
                    st.integers(),
                    st.floats(allow_nan=True, allow_infinity=True),
                ),
                max_size=8,
            ),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_commands_are_packed_byte_for_byte_as_redis_py_packs_them(
    commands: list[tuple[Any, list[Any]]],
) -> None:
    connection = Redis().connection_pool.make_connection()
    argv = [(name, *args) for name, args in commands]
    assert b"".join(pack_commands(connection, argv)) == b"".join(connection.pack_commands(argv))


def test_what_redis_py_refuses_to_pack_is_refused_the_same_way() -> None:
    connection = Redis().connection_pool.make_connection()
    for value in (None, True, np.int64(3)):
        with pytest.raises(DataError, match="Invalid input"):
            pack_commands(connection, [("SET", "key", value)])
    # What hiredis does not take but redis-py does goes through redis-py: a bytearray, a command
    # name of two words.
    for command in [("SET", "key", bytearray(b"value")), ("CLIENT SETNAME", "name")]:
        assert b"".join(pack_commands(connection, [command])) == b"".join(connection.pack_commands([command]))


async def test_replies_later_than_the_socket_timeout_fail_the_batch_and_close_its_connection(
    redis_url: str,
) -> None:
    """One deadline covers a batch's replies; past it the batch fails with redis-py's TimeoutError (not
    retried: a write may have landed) and the next batch goes on a new connection, not one whose late
    reply it would read as its own."""
    client = Redis.from_url(redis_url, socket_timeout=0.2)
    try:
        batch = RedisBatch(client)
        await client.set("after-the-timeout", "mine")
        blocked = batch.pipeline()
        blocked.blpop(["nothing-comes"], 2)  # Redis answers after 2 s, the deadline is 0.2 s
        with pytest.raises(RedisTimeoutError):
            await batch.send(blocked)
        await client.lpush("nothing-comes", "late")  # would be BLPOP's reply on the old connection
        pipeline = batch.pipeline()
        pipeline.get("after-the-timeout")
        assert await batch.send(pipeline) == [b"mine"]
    finally:
        await client.delete("after-the-timeout", "nothing-comes")
        await client.aclose()


async def _guarded(batch: RedisBatch, guard: str, fields: int) -> Any:
    """Queue an increment by script and a plain HSET, guarded; send them."""
    writes = batch.pipeline()
    queue_script(writes, INCREMENT, ["guarded-counter"], [5])
    writes.hset(guard, "mark", "1")
    commit = batch.pipeline()
    queue_guarded(commit, guard, fields, writes.command_stack)
    (applied,) = await batch.send(commit)
    return applied


async def test_guarded_commands_run_together_only_while_the_hash_has_the_fields_it_had(client: Redis) -> None:
    batch = RedisBatch(client)
    await client.hset("guard", mapping={"a": "1", "b": "2"})
    assert await _guarded(batch, "guard", 2) == 1  # as read: both commands ran
    assert await client.get("guarded-counter") == b"5"
    assert await client.hget("guard", "mark") == b"1"
    assert await _guarded(batch, "guard", 2) == 0  # the hash gained a field since: nothing ran
    assert await client.get("guarded-counter") == b"5"
    assert await _guarded(batch, "gone", 2) == 0  # no hash: nothing ran
    assert not await client.exists("gone")
    await client.script_flush()  # as after a Redis restart: sent again with its body, run once
    assert await _guarded(batch, "guard", 3) == 1
    assert await client.get("guarded-counter") == b"10"


async def test_guarded_scripts_must_go_by_sha(client: Redis) -> None:
    writes = client.pipeline(transaction=False)  # not a batch's: its scripts go with their body
    queue_script(writes, INCREMENT, ["guarded-counter"], [1])
    with pytest.raises(ValueError, match="RedisBatch pipeline"):
        queue_guarded(RedisBatch(client).pipeline(), "guard", 1, writes.command_stack)


@pytest.fixture
def redis_without_hello(tmp_path: Path) -> Iterator[str]:
    """A Redis that refuses HELLO (as an old server or some proxies do): redis-py falls back to RESP2."""
    with running_redis(tmp_path, "--rename-command", "HELLO", "") as url:
        yield url


async def test_replies_are_parsed_as_redis_py_parses_them_after_a_fall_back_to_resp2(
    redis_without_hello: str,
) -> None:
    client = Redis.from_url(redis_without_hello)
    try:
        await client.hset("hash", mapping={"field": "value"})
        batch = RedisBatch(client)
        pipeline = batch.pipeline()
        pipeline.hgetall("hash")
        pipeline.hget("hash", "field")
        assert await batch.send(pipeline) == [{b"field": b"value"}, b"value"]
    finally:
        await client.aclose()


async def test_text_that_is_no_unicode_fails_only_its_own_request(client: Redis) -> None:
    """A lone surrogate (what a "\\ud800" escape decodes to) cannot be sent: its request fails, the
    others of its batch go."""
    batch = SignallingBatch(client, waiting_for=2)
    held = await hold_a_batch_out(batch)
    bad, good = batch.pipeline(), batch.pipeline()
    bad.set("bad", "gold\ud800")
    good.set("good", "1")
    sent = [asyncio.create_task(batch.send(pipeline)) for pipeline in (bad, good)]
    await batch.queued.wait()
    await client.lpush("wake", "go")
    await held
    with pytest.raises(DataError, match="not valid Unicode"):
        await sent[0]
    assert await sent[1] == [True]
    assert await client.get("good") == b"1"
