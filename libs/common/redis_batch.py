"""Coalesced Redis round trips: the commands that concurrent requests queue go to Redis together,
in one write (no transaction), and each request awaits the replies to its own commands. A batch
leaves at once when none is out; the requests that come while one is out go together in the next
(group commit; measured with bench/invoke_throughput.py at 50 in flight: 0.84 ms of replica CPU per
Invoke, against 1.02 when every loop turn sent its own batch).

A request builds a pipeline as usual (`batch.pipeline()`, then `pipeline.hgetall(...)` and so on)
and awaits `batch.send(pipeline)` instead of `pipeline.execute()`. With many requests in flight, a
replica then pays redis-py's and the event loop's cost of a round trip once per batch instead of
once per request. One batch is out at a time, so the batches have a connection of their own,
written and read directly (redis-py's pipeline and pool cost 77 us of CPU per round trip, this 43).
Nothing is acknowledged early: a request resumes only when Redis has answered every command of the
batch it joined. An error answering one command (a script's error, a wrong type) fails only the
request that queued it, and so does an argument that cannot be packed (the batch is then sent again
request by request: nothing of it had been sent); a connection error fails every request of the
batch. A request cancelled before its batch leaves sends nothing.

Scripts go by SHA (`queue_script`): a batch that meets NOSCRIPT (Redis restarted, or its script
cache was flushed) sends those commands again with the script's body, which loads it; NOSCRIPT
means the script did not run, so nothing runs twice. Such a script then runs after the other
commands of its batch: a request must not read, in the same batch, what its script writes (as when
a connection breaks mid-batch, a resend that fails leaves the batch's other writes standing).
Scripts on any other pipeline go with their body (EVAL): inside MULTI/EXEC a NOSCRIPT would not stop
the rest of the transaction, and a pipeline sent on its own has nothing to send the body again.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Sequence
from typing import Any

import hiredis
from redis._parsers.response_callbacks import _get_response_callback
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

# A batch holds at most this many commands; the requests beyond it go in the next batch.
MAX_BATCH_COMMANDS = 2000

Command = tuple[tuple[Any, ...], dict[str, Any]]


_SENT_IN_BATCHES = "liveloop_sent_in_batches"  # marks the pipelines a RedisBatch hands out

# Every script queued by SHA, by its SHA-1: what a batch sends again when Redis lacks one.
_SCRIPT_BODIES: dict[str, str] = {}
_SCRIPT_SHAS: dict[str, str] = {}


def queue_script(pipeline: Any, body: str, keys: Sequence[str], args: Sequence[Any]) -> None:
    """Queue a Lua script: by SHA on a pipeline of a `RedisBatch` (which sends the body again on
    NOSCRIPT), with its body on any other pipeline (a transaction's included)."""
    if not getattr(pipeline, _SENT_IN_BATCHES, False):
        pipeline.eval(body, len(keys), *keys, *args)
        return
    sha = _SCRIPT_SHAS.get(body)
    if sha is None:
        sha = _SCRIPT_SHAS[body] = hashlib.sha1(body.encode()).hexdigest()  # Redis names scripts by SHA-1
        _SCRIPT_BODIES[sha] = body
    pipeline.evalsha(sha, len(keys), *keys, *args)


# KEYS[1]: the guarding hash, then the keys of the guarded scripts. ARGV[1]: the hash's field count
# when it was read; ARGV[2]: how many commands follow, each as "script", its SHA-1, the index of its
# first key in KEYS, its key count, its argument count and its arguments, or as "call", its word
# count and its words. Runs them all, atomically, only while the hash has the fields it had: 1, else 0.
_GUARD_HEAD = """-- liveloop guard
local scripts = {}
"""
_GUARD_BODY = """
if redis.call('HLEN', KEYS[1]) ~= tonumber(ARGV[1]) then
  return 0
end
local at = 3
for _ = 1, tonumber(ARGV[2]) do
  if ARGV[at] == 'script' then
    local first, key_count, arg_count = tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
    local keys = {unpack(KEYS, first, first + key_count - 1)}
    local args = {unpack(ARGV, at + 5, at + 4 + arg_count)}
    scripts[ARGV[at + 1]](keys, args)
    at = at + 5 + arg_count
  else
    local count = tonumber(ARGV[at + 1])
    redis.call(unpack(ARGV, at + 2, at + 1 + count))
    at = at + 2 + count
  end
end
return 1
"""
_guards: dict[int, str] = {}  # by the number of scripts it holds


def _guard_script() -> str:
    """The guard, holding every script queued so far as a function (a script cannot call another)."""
    scripts = {sha: body for sha, body in _SCRIPT_BODIES.items() if not body.startswith(_GUARD_HEAD)}
    guard = _guards.get(len(scripts))
    if guard is None:
        functions = "".join(
            f"scripts['{sha}'] = function(KEYS, ARGV)\n{body}\nend\n" for sha, body in sorted(scripts.items())
        )
        guard = _guards[len(scripts)] = _GUARD_HEAD + functions + _GUARD_BODY
    return guard


def queue_guarded(pipeline: Any, guard: str, fields: int, commands: Sequence[Command]) -> None:
    """Queue `commands` (queued on a `RedisBatch` pipeline: scripts by SHA) as one script that runs
    them only while the hash `guard` still has `fields` fields, and answers 1 when it ran them, 0
    when not. It is a compare-and-set for a hash that only ever gains fields (a contact gains its
    answer marks): unlike WATCH and MULTI/EXEC it needs no connection of its own, so it goes in a
    batch with the commands of concurrent requests. As in a transaction, a command that fails stops
    the rest and what ran before it stays."""
    keys: list[Any] = [guard]
    argv: list[Any] = [fields, len(commands)]
    for args, _ in commands:
        if args[0] == "EVALSHA":
            sha, key_count = str(args[1]), int(args[2])
            if sha not in _SCRIPT_BODIES:
                raise ValueError(f"script {sha} was not queued with queue_script")
            script_args = args[3 + key_count :]
            argv += ["script", sha, len(keys) + 1, key_count, len(script_args), *script_args]
            keys += args[3 : 3 + key_count]
        elif args[0] == "EVAL":
            raise ValueError("queue the guarded commands on a RedisBatch pipeline: scripts go by SHA")
        else:
            argv += ["call", len(args), *args]
    queue_script(pipeline, _guard_script(), keys, argv)


def pack_commands(connection: Any, commands: Sequence[tuple[Any, ...]]) -> list[bytes]:
    """The commands in Redis's protocol, as `connection.pack_commands` packs them, in a fraction of
    its CPU: hiredis packs each command whole, where redis-py first encodes every argument in Python
    (87 us against 11 for a Respond's transaction). A command name with a space, or an argument
    hiredis does not take (a bytearray; a bool, None or numpy integer, which redis-py refuses with
    DataError), goes through redis-py's own packing. Text that cannot be encoded (a lone surrogate)
    raises DataError too, as an argument that does not encode, so a batch fails only its request."""
    if any(" " in str(args[0]) for args in commands):  # a command name of two words ("CLIENT SETNAME")
        return _packed_by_redis_py(connection, commands)
    try:
        return [b"".join([hiredis.pack_command(args) for args in commands])]
    except TypeError:
        return _packed_by_redis_py(connection, commands)
    except UnicodeEncodeError as error:  # text with a lone surrogate (from a "\ud800" escape)
        raise DataError(f"text that is not valid Unicode: {error}") from None


def _packed_by_redis_py(connection: Any, commands: Sequence[tuple[Any, ...]]) -> list[bytes]:
    try:
        return list(connection.pack_commands(commands))
    except UnicodeEncodeError as error:
        raise DataError(f"text that is not valid Unicode: {error}") from None


async def exchange(redis: Redis, connection: Any, commands: Sequence[Command]) -> list[Any]:
    """Write the commands at once and read their replies, in order, each parsed as redis-py parses
    its command's (an error reply in its place, as the exception). One deadline, the connection's
    socket timeout, covers every reply: redis-py sets a timer per reply (10 us of CPU each here).
    An argument that does not encode raises DataError before anything is sent;
    a timeout raises redis-py's TimeoutError, and the connection, its replies unread, is closed."""
    packed = pack_commands(connection, [args for args, _ in commands])
    await connection.send_packed_command(packed)
    callbacks = redis.response_callbacks
    replies: list[Any] = []
    try:
        async with asyncio.timeout(connection.socket_timeout):
            for args, options in commands:
                try:
                    reply = await connection.read_response(timeout=math.inf)  # no timer of its own
                except ResponseError as error:
                    replies.append(error)
                    continue
                # As redis-py picks it: a connection that fell back from RESP3 to RESP2 parses RESP2.
                callback = _get_response_callback(callbacks, args[0], connection)
                if callback is not None:
                    reply = callback(reply, **{k: v for k, v in options.items() if k != "keys"})
                replies.append(reply)
    except TimeoutError:
        await connection.disconnect(nowait=True)
        raise RedisTimeoutError(f"Timeout reading from {connection.host}:{connection.port}") from None
    return replies


class _Waiting:
    __slots__ = ("commands", "future")

    def __init__(self, commands: list[Command], future: asyncio.Future[list[Any]]) -> None:
        self.commands = commands
        self.future = future


class RedisBatch:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._waiting: list[_Waiting] = []
        self._flush_scheduled = False
        self._out = False  # a batch is on its way
        # The batches' own connection, taken from the pool once (closing the client closes it).
        self._connection: Any = None
        self.round_trips = 0

    def pipeline(self) -> Any:
        """A pipeline (no transaction) to queue a request's commands on; send it with `send`."""
        pipeline = self._redis.pipeline(transaction=False)
        setattr(pipeline, _SENT_IN_BATCHES, True)
        return pipeline

    async def send(self, pipeline: Any) -> list[Any]:
        """The replies to the pipeline's commands, in order, once Redis answered its batch. Raises
        the first error among them (as `pipeline.execute()` does)."""
        commands: list[Command] = list(pipeline.command_stack)
        pipeline.command_stack.clear()
        if not commands:
            return []
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._waiting.append(_Waiting(commands, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        replies = await future
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def _flush(self) -> None:
        self._flush_scheduled = False
        # Nothing was acknowledged to a request cancelled while it waited: its commands stay here.
        self._waiting = [item for item in self._waiting if not item.future.done()]
        if self._out or not self._waiting:
            return
        taken, count = 0, 0
        while taken < len(self._waiting) and (
            taken == 0 or count + len(self._waiting[taken].commands) <= MAX_BATCH_COMMANDS
        ):
            count += len(self._waiting[taken].commands)
            taken += 1
        batch, self._waiting = self._waiting[:taken], self._waiting[taken:]
        self._out = True
        task = asyncio.get_running_loop().create_task(self._round_trip(batch))
        task.add_done_callback(self._landed)

    def _landed(self, task: asyncio.Task[None]) -> None:
        _retrieve(task)
        self._out = False
        self._flush()  # what waited while the batch was out

    async def _round_trip(self, waiting: list[_Waiting]) -> None:
        commands = [command for item in waiting for command in item.commands]
        try:
            try:
                replies = await self._execute(commands)
            except DataError:
                # An argument that does not encode fails the packing, before anything is sent: each
                # request on its own, so that only the one that queued it fails.
                await self._one_by_one(waiting)
                return
            replies = await self._with_scripts_loaded(commands, replies)
        except asyncio.CancelledError:
            for item in waiting:
                item.future.cancel()
            raise
        except Exception as exc:
            for item in waiting:
                if not item.future.done():
                    item.future.set_exception(_copy(exc))
            return
        start = 0
        for item in waiting:
            end = start + len(item.commands)
            if not item.future.done():  # its request may have been cancelled meanwhile
                item.future.set_result(replies[start:end])
            start = end

    async def _one_by_one(self, waiting: list[_Waiting]) -> None:
        for item in waiting:
            try:
                replies = await self._execute(item.commands)
                replies = await self._with_scripts_loaded(item.commands, replies)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not item.future.done():
                    item.future.set_exception(exc)
                continue
            if not item.future.done():
                item.future.set_result(replies)

    async def _execute(self, commands: list[Command]) -> list[Any]:
        """One write and the replies, parsed as redis-py parses a pipeline's (a command's error in
        its place). A connection found broken is replaced and the batch sent once more, as
        libs/common/redis_connection.py does for every command; a timeout is never retried."""
        for attempt in range(2):
            if self._connection is None:
                self._connection = await self._redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]
            connection = self._connection
            try:
                self.round_trips += 1
                return await exchange(self._redis, connection, commands)
            except DataError:
                self.round_trips -= 1  # nothing was sent
                raise
            except RedisConnectionError:
                await connection.disconnect()
                if attempt:
                    raise
            except BaseException:
                # Replies may be left unread on the socket: the connection is never used as is again.
                await connection.disconnect(nowait=True)
                raise
        raise AssertionError("unreachable")

    async def _with_scripts_loaded(self, commands: list[Command], replies: list[Any]) -> list[Any]:
        """Send the scripts that met NOSCRIPT again, with their body."""
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if not missing:
            return replies
        again: list[Command] = []
        for i in missing:
            args, options = commands[i]
            body = _SCRIPT_BODIES.get(str(args[1]))
            if args[0] != "EVALSHA" or body is None:
                continue
            again.append((("EVAL", body, *args[2:]), options))
        if len(again) != len(missing):
            return replies
        for i, reply in zip(missing, await self._execute(again), strict=True):
            replies[i] = reply
        return replies


def _copy(exc: Exception) -> Exception:
    """Each waiting request gets its own exception object: one raised in many tasks at once would
    collect every task's traceback."""
    try:
        clone = type(exc)(*exc.args)
    except Exception:
        return exc
    clone.__cause__ = exc
    return clone


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
