"""The project's channels (`libs.common.client`) against a real server: retries, deadlines, keys."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from libs.common.client import open_blocking_channel, open_channel
from libs.common.config_follower import ConfigFollower
from libs.common.server import RunningServer
from tests.conftest import ApiKeys
from tests.grpc.conftest import target
from tests.grpc.probe_service import (
    Probe,
    chunks,
    method,
    received_then_status,
    status_of,
    stream_stream,
    stream_unary,
    unary,
    unary_stream,
)

pytestmark = pytest.mark.timeout(30)

MAX_ATTEMPTS = 4  # libs.common.client.service_config's default


@pytest.mark.parametrize("failures", [1, MAX_ATTEMPTS - 1])
async def test_unavailable_is_retried_until_the_call_succeeds(
    failures: int, probe: Probe, probe_server: RunningServer, api_keys: ApiKeys
) -> None:
    probe.unavailable_failures = failures
    async with open_channel(target(probe_server), api_key=api_keys.invoke, deadline_seconds=10) as channel:
        response = await unary(channel, "Flaky")(b"")
    assert response == f"ok after {failures + 1}".encode()
    assert probe.attempts["Flaky"] == failures + 1


async def test_retries_on_unavailable_are_bounded(
    probe: Probe, probe_server: RunningServer, api_keys: ApiKeys
) -> None:
    probe.unavailable_failures = MAX_ATTEMPTS + 5
    async with open_channel(target(probe_server), api_key=api_keys.invoke, deadline_seconds=10) as channel:
        code, details = await status_of(unary(channel, "Flaky")(b""))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details == f"warming up (attempt {MAX_ATTEMPTS})"
    assert probe.attempts["Flaky"] == MAX_ATTEMPTS


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("InvalidArgument", grpc.StatusCode.INVALID_ARGUMENT),
        ("NotFound", grpc.StatusCode.NOT_FOUND),
        ("Crash", grpc.StatusCode.INTERNAL),
        ("NotImplemented", grpc.StatusCode.UNIMPLEMENTED),
    ],
)
async def test_other_errors_are_attempted_exactly_once(
    name: str, code: grpc.StatusCode, probe: Probe, probe_server: RunningServer, api_keys: ApiKeys
) -> None:
    async with open_channel(target(probe_server), api_key=api_keys.invoke, deadline_seconds=10) as channel:
        got, _ = await status_of(unary(channel, name)(b""))
    assert got == code
    assert probe.attempts[name] == 1


async def test_the_default_deadline_ends_a_call_that_never_answers(
    probe: Probe, probe_server: RunningServer, api_keys: ApiKeys
) -> None:
    async with open_channel(target(probe_server), api_key=api_keys.invoke, deadline_seconds=0.5) as channel:
        code, _ = await status_of(unary(channel, "Hang")(b""))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    # The probe_server fixture sets `probe.never` on teardown, releasing any waiting handler.


@pytest.mark.parametrize("deadline_seconds", [0.5, 2.5])
async def test_the_default_deadline_lets_the_call_run_for_its_full_length(
    deadline_seconds: float, probe: Probe, probe_server: RunningServer, api_keys: ApiKeys
) -> None:
    async with open_channel(
        target(probe_server), api_key=api_keys.invoke, deadline_seconds=deadline_seconds
    ) as channel:
        started = time.monotonic()
        code, _ = await status_of(unary(channel, "Hang")(b""))
        elapsed = time.monotonic() - started
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert probe.attempts.get("Hang") == 1, "the call never reached the server"
    assert elapsed >= deadline_seconds - 0.1, elapsed


async def test_the_default_deadline_reaches_the_server(
    probe_server: RunningServer, api_keys: ApiKeys
) -> None:
    async with open_channel(target(probe_server), api_key=api_keys.invoke, deadline_seconds=7) as channel:
        remaining = await unary(channel, "TimeRemaining")(b"")
    assert remaining != b"none", "the server sees no deadline"
    assert 5 < float(remaining) <= 7.5


async def test_a_per_call_timeout_reaches_the_server(probe_server: RunningServer, api_keys: ApiKeys) -> None:
    async with open_channel(target(probe_server), api_key=api_keys.invoke, deadline_seconds=30) as channel:
        remaining = float(await unary(channel, "TimeRemaining")(b"", timeout=3))
    # grpc-timeout is rounded up on the wire, so the server may see a hair more than 3 s.
    assert 1 < remaining <= 3.5


async def test_a_per_call_timeout_shorter_than_the_default_applies(
    probe: Probe, probe_server: RunningServer, api_keys: ApiKeys
) -> None:
    async with open_channel(target(probe_server), api_key=api_keys.invoke, deadline_seconds=30) as channel:
        started = time.monotonic()
        code, _ = await status_of(unary(channel, "Hang")(b"", timeout=0.5))
        elapsed = time.monotonic() - started
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert probe.attempts["Hang"] == 1
    assert 0.4 <= elapsed < 5, elapsed


async def test_open_channel_sends_the_key_on_unary_calls(
    probe_server: RunningServer, api_keys: ApiKeys
) -> None:
    async with open_channel(target(probe_server), api_key=api_keys.admin) as channel:
        assert await unary(channel, "AdminOnly")(b"") == b"admin"
    async with open_channel(target(probe_server)) as channel:
        code, _ = await status_of(unary(channel, "AdminOnly")(b""))
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def _stream_outcome(channel: grpc.aio.Channel, kind: str) -> tuple[Any, grpc.StatusCode]:
    """Call a streaming probe method of the given kind; what came back and the final status."""
    if kind == "unary-stream":
        received, code, _ = await received_then_status(unary_stream(channel, "StreamThenCrash")(b""))
        return received, code
    if kind == "stream-unary":
        try:
            return await stream_unary(channel, "CountNonEmpty")(chunks(b"a", b"b")), grpc.StatusCode.OK
        except grpc.aio.AioRpcError as error:
            return None, error.code()
    received, code, _ = await received_then_status(
        stream_stream(channel, "EchoThenNotFound")(chunks(b"a", b"missing"))
    )
    return received, code


# What each streaming probe method gives a caller whose key is accepted.
AUTHENTICATED_OUTCOME: dict[str, tuple[Any, grpc.StatusCode]] = {
    "unary-stream": ([b"1", b"2"], grpc.StatusCode.INTERNAL),
    "stream-unary": (b"2", grpc.StatusCode.OK),
    "stream-stream": ([b"a"], grpc.StatusCode.NOT_FOUND),
}


@pytest.mark.parametrize("kind", sorted(AUTHENTICATED_OUTCOME))
async def test_per_call_metadata_authenticates_streaming_calls(
    kind: str, probe_server: RunningServer, api_keys: ApiKeys
) -> None:
    """The control for the test below: the outcomes are right when the key does arrive."""
    async with grpc.aio.insecure_channel(target(probe_server)) as channel:
        metadata = (("x-api-key", api_keys.invoke),)
        if kind == "unary-stream":
            received, code, _ = await received_then_status(
                unary_stream(channel, "StreamThenCrash")(b"", metadata=metadata)
            )
            outcome: tuple[Any, grpc.StatusCode] = (received, code)
        elif kind == "stream-unary":
            outcome = (
                await stream_unary(channel, "CountNonEmpty")(chunks(b"a", b"b"), metadata=metadata),
                grpc.StatusCode.OK,
            )
        else:
            received, code, _ = await received_then_status(
                stream_stream(channel, "EchoThenNotFound")(chunks(b"a", b"missing"), metadata=metadata)
            )
            outcome = (received, code)
    assert outcome == AUTHENTICATED_OUTCOME[kind]


# grpc.aio files an interceptor under the first call kind it subclasses: a single interceptor
# class for all four kinds would add the key to unary-unary calls only.
@pytest.mark.parametrize("kind", sorted(AUTHENTICATED_OUTCOME))
async def test_open_channel_sends_the_key_on_streaming_calls(
    kind: str, probe_server: RunningServer, api_keys: ApiKeys
) -> None:
    async with open_channel(target(probe_server), api_key=api_keys.invoke) as channel:
        outcome = await _stream_outcome(channel, kind)
    assert outcome == AUTHENTICATED_OUTCOME[kind]


async def test_a_config_follower_with_a_service_key_receives_the_config(
    config_server: RunningServer, api_keys: ApiKeys, tmp_path: Path
) -> None:
    follower = ConfigFollower(
        target=target(config_server),
        api_key=api_keys.service,
        replica_id="grpc-test-follower",
        state_dir=tmp_path / "follower",
        service="grpc-test",
    )
    await follower.start()
    try:
        # An empty store still answers a subscription with a (revision 0) snapshot, in milliseconds.
        await asyncio.wait_for(follower.ready.wait(), timeout=3)
    finally:
        await follower.stop()
    assert follower.current is not None
    assert follower.current.revision == 0


# The blocking channel (CLI, scripts). The server runs on this test's event loop, so blocking
# calls go to a thread.


def _blocking(
    probe_server: RunningServer, api_key: str | None, deadline_seconds: float, call: Callable[[Any], Any]
) -> Any:
    with open_blocking_channel(
        target(probe_server), api_key=api_key, deadline_seconds=deadline_seconds
    ) as channel:
        return call(channel)


def _blocking_unary(channel: grpc.Channel, name: str) -> Any:
    return channel.unary_unary(method(name), request_serializer=None, response_deserializer=None)


async def test_blocking_channel_retries_unavailable_and_sends_the_key(
    probe: Probe, probe_server: RunningServer, api_keys: ApiKeys
) -> None:
    probe.unavailable_failures = 2
    response = await asyncio.to_thread(
        _blocking, probe_server, api_keys.invoke, 10, lambda ch: _blocking_unary(ch, "Flaky")(b"")
    )
    assert response == b"ok after 3"
    assert probe.attempts["Flaky"] == 3


async def test_blocking_channel_sends_the_key_on_streaming_calls(
    probe_server: RunningServer, api_keys: ApiKeys
) -> None:
    def stream(channel: grpc.Channel) -> tuple[list[bytes], grpc.StatusCode]:
        call = channel.unary_stream(method("StreamThenCrash"))(b"")
        received: list[bytes] = []
        try:
            received.extend(call)
        except grpc.RpcError as error:
            return received, error.code()
        return received, grpc.StatusCode.OK

    outcome = await asyncio.to_thread(_blocking, probe_server, api_keys.invoke, 10, stream)
    assert outcome == ([b"1", b"2"], grpc.StatusCode.INTERNAL)


def _hang(channel: grpc.Channel) -> grpc.StatusCode:
    try:
        _blocking_unary(channel, "Hang")(b"")
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_blocking_channel_default_deadline(probe_server: RunningServer, api_keys: ApiKeys) -> None:
    code = await asyncio.to_thread(_blocking, probe_server, api_keys.invoke, 0.5, _hang)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_blocking_channel_default_deadline_lets_the_call_reach_the_server(
    probe: Probe, probe_server: RunningServer, api_keys: ApiKeys
) -> None:
    code = await asyncio.to_thread(_blocking, probe_server, api_keys.invoke, 0.5, _hang)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert probe.attempts.get("Hang") == 1, "the call never reached the server"
