"""The shared interceptors on a real server: error mapping, API keys and roles, RPC metrics.

The probe service (tests/grpc/probe_service.py) is served through `start_server`, so the same
interceptor chain as every liveloop service runs: telemetry, then auth, then errors.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from libs.common.server import RunningServer
from tests.conftest import ApiKeys
from tests.grpc.conftest import target
from tests.grpc.probe_service import (
    SECRET,
    Probe,
    chunks,
    key_metadata,
    probe_settings,
    received_then_status,
    serving_probe,
    status_of,
    stream_stream,
    stream_unary,
    unary,
    unary_stream,
)
from tests.polling import eventually

pytestmark = pytest.mark.timeout(30)

PROBE = "grpc-test-probe"  # the service label of the probe's metrics
INTERNAL_MESSAGE = re.compile(r"^internal error \(ref [0-9a-f]{12}\)$")


@pytest.fixture
async def plain_channel(probe_server: RunningServer) -> AsyncIterator[aio.Channel]:
    """A bare channel: every test says which key, if any, each call carries."""
    async with aio.insecure_channel(target(probe_server)) as open_:
        yield open_


async def _assert_still_serving(channel: aio.Channel, api_keys: ApiKeys) -> None:
    assert await unary(channel, "Ok")(b"again", metadata=key_metadata(api_keys.invoke)) == b"ok:again"


def _requests_total(method: str, code: str) -> float:
    sample = REGISTRY.get_sample_value(
        "liveloop_rpc_requests_total", {"service": PROBE, "method": method, "code": code}
    )
    return sample or 0.0


def _latency_count(method: str) -> float:
    sample = REGISTRY.get_sample_value(
        "liveloop_rpc_latency_seconds_count", {"service": PROBE, "method": method}
    )
    return sample or 0.0


# Errors -----------------------------------------------------------------------------------------


async def test_ok_call_returns_the_handler_response(plain_channel: aio.Channel, api_keys: ApiKeys) -> None:
    assert await unary(plain_channel, "Ok")(b"x", metadata=key_metadata(api_keys.invoke)) == b"ok:x"


async def test_invalid_argument_names_the_field(plain_channel: aio.Channel, api_keys: ApiKeys) -> None:
    call = unary(plain_channel, "InvalidArgument")(b"", metadata=key_metadata(api_keys.invoke))
    code, details = await status_of(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "offer_count: must be positive"
    await _assert_still_serving(plain_channel, api_keys)


async def test_not_found_keeps_its_message(plain_channel: aio.Channel, api_keys: ApiKeys) -> None:
    call = unary(plain_channel, "NotFound")(b"", metadata=key_metadata(api_keys.invoke))
    assert await status_of(call) == (grpc.StatusCode.NOT_FOUND, "offer 'summer-bundle' does not exist")
    await _assert_still_serving(plain_channel, api_keys)


@pytest.mark.parametrize("method", ["Crash", "SyncCrash"])
async def test_an_unexpected_error_is_internal_without_its_text_and_logged_with_a_reference(
    method: str, plain_channel: aio.Channel, api_keys: ApiKeys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="libs.common.interceptors")
    call = unary(plain_channel, method)(b"", metadata=key_metadata(api_keys.invoke))
    code, details = await status_of(call)
    assert code == grpc.StatusCode.INTERNAL
    assert INTERNAL_MESSAGE.match(details), details
    assert SECRET not in details
    # The operator finds the traceback by the reference the caller was given.
    reference = details.removeprefix("internal error (ref ").removesuffix(")")
    logged = [record for record in caplog.records if reference in record.getMessage()]
    assert len(logged) == 1, [record.getMessage() for record in caplog.records]
    assert logged[0].exc_info is not None
    assert isinstance(logged[0].exc_info[1], RuntimeError)
    assert str(logged[0].exc_info[1]) == SECRET
    await _assert_still_serving(plain_channel, api_keys)


async def test_not_implemented_error_is_unimplemented(plain_channel: aio.Channel, api_keys: ApiKeys) -> None:
    call = unary(plain_channel, "NotImplemented")(b"", metadata=key_metadata(api_keys.invoke))
    code, details = await status_of(call)
    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert SECRET not in details
    await _assert_still_serving(plain_channel, api_keys)


@pytest.mark.parametrize("method", ["StreamThenCrash", "WriteThenCrash"])
async def test_a_stream_that_fails_midway_delivers_what_it_sent_then_internal(
    method: str, plain_channel: aio.Channel, api_keys: ApiKeys
) -> None:
    call = unary_stream(plain_channel, method)(b"", metadata=key_metadata(api_keys.invoke))
    received, code, details = await received_then_status(call)
    assert received == ([b"1", b"2"] if method == "StreamThenCrash" else [b"1"])
    assert code == grpc.StatusCode.INTERNAL
    assert INTERNAL_MESSAGE.match(details), details
    await _assert_still_serving(plain_channel, api_keys)


async def test_a_client_stream_error_maps_to_itsstatus_of(
    plain_channel: aio.Channel, api_keys: ApiKeys
) -> None:
    count = stream_unary(plain_channel, "CountNonEmpty")
    metadata = key_metadata(api_keys.invoke)
    assert await count(chunks(b"a", b"b"), metadata=metadata) == b"2"
    code, details = await status_of(count(chunks(b"a", b""), metadata=metadata))
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "chunk: must not be empty")
    await _assert_still_serving(plain_channel, api_keys)


async def test_a_bidirectional_stream_error_maps_to_itsstatus_of(
    plain_channel: aio.Channel, api_keys: ApiKeys
) -> None:
    call = stream_stream(plain_channel, "EchoThenNotFound")(
        chunks(b"a", b"b", b"missing", b"never"), metadata=key_metadata(api_keys.invoke)
    )
    received, code, details = await received_then_status(call)
    assert received == [b"a", b"b"]
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, "offer 'missing' does not exist")
    await _assert_still_serving(plain_channel, api_keys)


@pytest.mark.parametrize("api_key", ["admin", None])
async def test_an_unknown_method_is_unimplemented(
    api_key: str | None, plain_channel: aio.Channel, api_keys: ApiKeys
) -> None:
    key = api_keys.admin if api_key else None
    call = unary(plain_channel, "NoSuchMethod")(b"", metadata=key_metadata(key))
    code, _ = await status_of(call)
    assert code == grpc.StatusCode.UNIMPLEMENTED
    await _assert_still_serving(plain_channel, api_keys)


# Auth -------------------------------------------------------------------------------------------


async def test_no_key_is_unauthenticated_and_the_handler_never_runs(
    plain_channel: aio.Channel, probe: Probe
) -> None:
    code, details = await status_of(unary(plain_channel, "Ok")(b""))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "x-api-key" in details
    assert "Ok" not in probe.attempts


@pytest.mark.parametrize(
    "wrong_key",
    ["nope", "ll_000000000000_unknownsecret", "Bearer", "ll__"],
    ids=["garbage", "unknown-id", "word-bearer", "empty-parts"],
)
async def test_a_wrong_key_is_unauthenticated(
    wrong_key: str, plain_channel: aio.Channel, probe: Probe
) -> None:
    code, _ = await status_of(unary(plain_channel, "Ok")(b"", metadata=key_metadata(wrong_key)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "Ok" not in probe.attempts


async def test_a_known_key_id_with_the_wrong_secret_is_unauthenticated(
    plain_channel: aio.Channel, api_keys: ApiKeys, probe: Probe
) -> None:
    prefix, key_id, secret = api_keys.admin.split("_", 2)
    forged = f"{prefix}_{key_id}_{secret[::-1]}"
    assert forged != api_keys.admin
    code, _ = await status_of(unary(plain_channel, "AdminOnly")(b"", metadata=key_metadata(forged)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "AdminOnly" not in probe.attempts


async def test_an_invoke_key_on_an_admin_method_is_permission_denied(
    plain_channel: aio.Channel, api_keys: ApiKeys, probe: Probe
) -> None:
    call = unary(plain_channel, "AdminOnly")(b"", metadata=key_metadata(api_keys.invoke))
    code, details = await status_of(call)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "admin" in details
    assert "AdminOnly" not in probe.attempts


async def test_an_admin_key_works_on_invoke_and_admin_methods(
    plain_channel: aio.Channel, api_keys: ApiKeys
) -> None:
    metadata = key_metadata(api_keys.admin)
    assert await unary(plain_channel, "Ok")(b"a", metadata=metadata) == b"ok:a"
    assert await unary(plain_channel, "AdminOnly")(b"", metadata=metadata) == b"admin"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
async def test_an_authorization_bearer_header_carries_the_key(
    scheme: str, plain_channel: aio.Channel, api_keys: ApiKeys
) -> None:
    metadata = (("authorization", f"{scheme} {api_keys.admin}"),)
    assert await unary(plain_channel, "AdminOnly")(b"", metadata=metadata) == b"admin"


async def test_an_authorization_header_of_another_scheme_is_unauthenticated(
    plain_channel: aio.Channel, api_keys: ApiKeys
) -> None:
    metadata = (("authorization", f"Basic {api_keys.admin}"),)
    code, _ = await status_of(unary(plain_channel, "Ok")(b"", metadata=metadata))
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_streaming_methods_are_refused_without_a_key(plain_channel: aio.Channel, probe: Probe) -> None:
    _, code, _ = await received_then_status(unary_stream(plain_channel, "StreamThenCrash")(b""))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = await status_of(stream_unary(plain_channel, "CountNonEmpty")(chunks(b"a")))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    _, code, _ = await received_then_status(stream_stream(plain_channel, "EchoThenNotFound")(chunks(b"a")))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert probe.attempts == {}


async def test_health_check_needs_no_key(plain_channel: aio.Channel) -> None:
    response = await health_pb2_grpc.HealthStub(plain_channel).Check(health_pb2.HealthCheckRequest())
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_check_ignores_a_wrong_key(plain_channel: aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(plain_channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(), metadata=key_metadata("nope"))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


# Metrics ----------------------------------------------------------------------------------------


async def test_every_rpc_is_counted_by_method_and_status(
    plain_channel: aio.Channel, api_keys: ApiKeys
) -> None:
    expected = {
        ("Probe/Ok", "OK"): 2,
        ("Probe/InvalidArgument", "INVALID_ARGUMENT"): 1,
        ("Probe/NotFound", "NOT_FOUND"): 1,
        ("Probe/Crash", "INTERNAL"): 1,
        ("Probe/NotImplemented", "UNIMPLEMENTED"): 1,
        ("Probe/StreamThenCrash", "INTERNAL"): 1,
        ("Probe/AdminOnly", "PERMISSION_DENIED"): 1,
        ("Probe/AdminOnly", "UNAUTHENTICATED"): 1,
        ("unknown", "UNIMPLEMENTED"): 1,
    }
    before = {labels: _requests_total(*labels) for labels in expected}
    latency_before = _latency_count("Probe/Ok")

    invoke = key_metadata(api_keys.invoke)
    await unary(plain_channel, "Ok")(b"", metadata=invoke)
    await unary(plain_channel, "Ok")(b"", metadata=invoke)
    for method in ("InvalidArgument", "NotFound", "Crash", "NotImplemented"):
        await status_of(unary(plain_channel, method)(b"", metadata=invoke))
    await received_then_status(unary_stream(plain_channel, "StreamThenCrash")(b"", metadata=invoke))
    await status_of(unary(plain_channel, "AdminOnly")(b"", metadata=invoke))
    await status_of(unary(plain_channel, "AdminOnly")(b""))
    await status_of(unary(plain_channel, "NoSuchMethod")(b"", metadata=invoke))
    # Health checks are not business RPCs and are not counted.
    await health_pb2_grpc.HealthStub(plain_channel).Check(health_pb2.HealthCheckRequest())

    after = {labels: _requests_total(*labels) for labels in expected}
    assert {labels: after[labels] - before[labels] for labels in expected} == expected
    assert _latency_count("Probe/Ok") - latency_before == 2
    assert (
        REGISTRY.get_sample_value(
            "liveloop_rpc_requests_total", {"service": PROBE, "method": "Health/Check", "code": "OK"}
        )
        is None
    )


async def test_load_beyond_the_limit_is_shed_at_once_not_queued(probe: Probe, api_keys: ApiKeys) -> None:
    """Two calls in flight fill a server allowed two: the third is RESOURCE_EXHAUSTED at once, and
    the server takes calls again once those finish."""
    settings = probe_settings(api_keys.file, max_concurrent_rpcs=2)
    async with serving_probe(probe, settings) as running, aio.insecure_channel(target(running)) as channel:
        metadata = key_metadata(api_keys.invoke)
        hanging = [asyncio.ensure_future(unary(channel, "Hang")(b"", metadata=metadata)) for _ in range(2)]
        await eventually(lambda: _hanging(probe, 2), within=10, what="two calls in flight")
        code, details = await status_of(unary(channel, "Ok")(b"third", metadata=metadata, timeout=10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        probe.never.set()  # release the two
        assert [await call for call in hanging] == [b"released", b"released"]
        assert await unary(channel, "Ok")(b"again", metadata=metadata) == b"ok:again"


async def _hanging(probe: Probe, count: int) -> bool:
    return probe.attempts.get("Hang", 0) >= count
