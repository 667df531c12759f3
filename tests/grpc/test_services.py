"""The five services, each built as in production and served on port 0 with auth on."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from libs.common.auth import Role
from libs.common.errors import FailedPrecondition, Unavailable
from libs.common.interceptors import OPEN_METHOD_PREFIXES
from libs.common.server import RunningServer
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from tests.conftest import ApiKeys
from tests.grpc.conftest import (
    PREDICTOR_REPLICA_ID,
    SERVICES_UNDER_TEST,
    Rpc,
    ServiceUnderTest,
    channel,
    health_status,
    start_status,
    started,
    target,
)
from tests.grpc.probe_service import received_then_status, status_of
from tests.polling import eventually

pytestmark = pytest.mark.timeout(60)

GRPCURL = Path(sys.executable).parent / "grpcurl"
ALL_SERVICES = sorted(SERVICES_UNDER_TEST)


def _identity(message: bytes) -> bytes:
    return message


# What grpc's client reports when the server ends a streaming call (refusing it) while the client
# is still writing its request: the server's own status is lost (see ../shared/PLATFORM-NOTES.md).
CLIENT_WRITE_RACE = "Internal error from Core"


async def _rpc_status(running: RunningServer, rpc: Rpc, api_key: str | None) -> grpc.StatusCode:
    """Call any RPC with empty messages (valid for any proto) and return its final status. A
    streaming call that lost the server's status to the client's write race is made again."""
    for _ in range(3):
        code, details = await _one_call(running, rpc, api_key)
        if not (rpc.client_streaming and code == grpc.StatusCode.INTERNAL and details == CLIENT_WRITE_RACE):
            break
    return code


async def _one_call(running: RunningServer, rpc: Rpc, api_key: str | None) -> tuple[grpc.StatusCode, str]:
    metadata = () if api_key is None else (("x-api-key", api_key),)
    # A bare channel: the test alone decides which metadata goes out, so only the server is tested.
    async with grpc.aio.insecure_channel(target(running)) as open_:
        codecs = {"request_serializer": _identity, "response_deserializer": _identity}
        if rpc.client_streaming and rpc.server_streaming:
            call = open_.stream_stream(rpc.path, **codecs)(iter([b""]), metadata=metadata, timeout=10)
            return (await received_then_status(call))[1:]
        if rpc.client_streaming:
            call = open_.stream_unary(rpc.path, **codecs)(iter([b""]), metadata=metadata, timeout=10)
            return await status_of(call)
        if rpc.server_streaming:
            call = open_.unary_stream(rpc.path, **codecs)(b"", metadata=metadata, timeout=10)
            return (await received_then_status(call))[1:]
        call = open_.unary_unary(rpc.path, **codecs)(b"", metadata=metadata, timeout=10)
        return await status_of(call)


async def _build_and_stop(service: ServiceUnderTest, settings: object) -> None:
    """For builds that must fail: if one starts after all, it is stopped, not leaked."""
    running = await service.build(settings)
    await running.stop()


async def test_health_reports_the_start_status_for_the_server_and_each_service(
    any_server: tuple[ServiceUnderTest, RunningServer],
) -> None:
    service, running = any_server
    expected = start_status(running)
    if service.name != "predictor":
        assert expected == "SERVING"
    assert await health_status(running, "") == expected
    for name in service.info.grpc_services:
        assert await health_status(running, name) == expected, name


async def test_health_of_an_unknown_service_is_not_found(
    any_server: tuple[ServiceUnderTest, RunningServer],
) -> None:
    _, running = any_server
    async with channel(running) as open_:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await health_pb2_grpc.HealthStub(open_).Check(
                health_pb2.HealthCheckRequest(service="no.such.Svc")
            )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_the_services_without_a_key(
    any_server: tuple[ServiceUnderTest, RunningServer],
) -> None:
    service, running = any_server
    # The server runs on this event loop, so the client must not block it.
    listed = await asyncio.to_thread(
        subprocess.run,
        [str(GRPCURL), "-plaintext", target(running), "list"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    names = set(listed.stdout.split())
    assert set(service.info.grpc_services) <= names, listed.stdout
    assert "grpc.health.v1.Health" in names


async def test_reflection_describes_every_method(
    any_server: tuple[ServiceUnderTest, RunningServer],
) -> None:
    service, running = any_server
    for full_name in service.info.grpc_services:
        described = await asyncio.to_thread(
            subprocess.run,
            [str(GRPCURL), "-plaintext", target(running), "describe", full_name],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert described.returncode == 0, described.stderr
        for rpc in service.rpcs():
            prefix, method = rpc.path.rsplit("/", 1)
            if prefix == f"/{full_name}":
                assert f"rpc {method} (" in described.stdout, (method, described.stdout)


async def test_every_rpc_is_unauthenticated_without_a_key(
    any_server: tuple[ServiceUnderTest, RunningServer],
) -> None:
    service, running = any_server
    codes = {
        rpc.path: await _rpc_status(running, rpc, None)
        for rpc in service.rpcs()
        if not rpc.path.startswith(OPEN_METHOD_PREFIXES)
    }
    assert codes == dict.fromkeys(codes, grpc.StatusCode.UNAUTHENTICATED)


async def test_only_health_answers_without_a_key() -> None:
    # GET /health, for balancers and probes that send no key, names nothing that is served.
    opened = [
        rpc.path
        for s in SERVICES_UNDER_TEST.values()
        for rpc in s.rpcs()
        if rpc.path.startswith(OPEN_METHOD_PREFIXES)
    ]
    assert opened == ["/liveloop.predictor.v1.PredictorService/Health"]


async def test_every_rpc_is_unauthenticated_with_a_wrong_key(
    any_server: tuple[ServiceUnderTest, RunningServer],
) -> None:
    service, running = any_server
    wrong = "ll_000000000000_wrong"
    codes = {
        rpc.path: await _rpc_status(running, rpc, wrong)
        for rpc in service.rpcs()
        if not rpc.path.startswith(OPEN_METHOD_PREFIXES)
    }
    assert codes == dict.fromkeys(codes, grpc.StatusCode.UNAUTHENTICATED)


def test_every_rpc_of_every_service_is_implemented() -> None:
    # No servicer still inherits protoc's UNIMPLEMENTED stub (the monitor was the last).
    pending = [
        rpc.path for service in SERVICES_UNDER_TEST.values() for rpc in service.rpcs() if not rpc.implemented
    ]
    assert pending == []


async def test_each_role_is_denied_every_rpc_outside_its_own(
    any_server: tuple[ServiceUnderTest, RunningServer], api_keys: ApiKeys
) -> None:
    service, running = any_server
    roles = running.definition.method_roles
    not_invoke = [rpc for rpc in service.rpcs() if roles.get(rpc.path, Role.ADMIN) is not Role.INVOKE]
    codes = {rpc.path: await _rpc_status(running, rpc, api_keys.invoke) for rpc in not_invoke}
    assert codes == dict.fromkeys(codes, grpc.StatusCode.PERMISSION_DENIED)
    not_service = [
        rpc
        for rpc in service.rpcs()
        if roles.get(rpc.path, Role.ADMIN) is not Role.SERVICE
        and not rpc.path.startswith(OPEN_METHOD_PREFIXES)
    ]
    codes = {rpc.path: await _rpc_status(running, rpc, api_keys.service) for rpc in not_service}
    assert codes == dict.fromkeys(codes, grpc.StatusCode.PERMISSION_DENIED)


async def test_predictor_ping_answers_with_the_replica_id_for_an_invoke_key(
    predictor_server: RunningServer, api_keys: ApiKeys
) -> None:
    async with channel(predictor_server, api_keys.invoke) as open_:
        response = await predictor_pb2_grpc.PredictorServiceStub(open_).Ping(predictor_pb2.PingRequest())
    assert response.replica_id == PREDICTOR_REPLICA_ID
    assert response.config_revision == 0
    assert response.server_time.seconds > 0


async def test_config_watch_is_open_to_service_keys_and_publish_is_not(
    config_server: RunningServer, api_keys: ApiKeys
) -> None:
    # The key goes as call metadata (the channel carries none): only the server's role table is tested.
    service = (("x-api-key", api_keys.service),)
    subscribe = config_pb2.WatchRequest(
        subscribe=config_pb2.Subscribe(replica_id="grpc-test-replica", service="grpc-test")
    )
    async with channel(config_server) as open_:
        stub = config_pb2_grpc.ConfigServiceStub(open_)
        watch = stub.Watch(iter([subscribe]), metadata=service, timeout=10)
        try:
            first = await anext(aiter(watch))
        finally:
            watch.cancel()
        assert first.WhichOneof("kind") is not None

        code, details = await status_of(stub.Publish(config_pb2.PublishRequest(), metadata=service))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "admin" in details


async def test_set_serving_switches_health_while_the_server_still_answers(
    any_server: tuple[ServiceUnderTest, RunningServer],
) -> None:
    service, running = any_server
    names = ("", *service.info.grpc_services)
    await running.set_serving(False)
    assert [await health_status(running, name) for name in names] == ["NOT_SERVING"] * len(names)
    # Draining: calls are still answered (here refused for want of a key, not UNAVAILABLE).
    assert await _rpc_status(running, service.rpcs()[0], None) == grpc.StatusCode.UNAUTHENTICATED
    await running.set_serving(True)
    assert [await health_status(running, name) for name in names] == ["SERVING"] * len(names)


async def test_predictor_answers_ping_while_not_serving(
    predictor_server: RunningServer, api_keys: ApiKeys
) -> None:
    await predictor_server.set_serving(False)
    async with channel(predictor_server, api_keys.invoke) as open_:
        ping = await predictor_pb2_grpc.PredictorServiceStub(open_).Ping(predictor_pb2.PingRequest())
    assert ping.replica_id == PREDICTOR_REPLICA_ID


@pytest.mark.parametrize("name", ALL_SERVICES)
async def test_stop_announces_not_serving_to_watchers_before_closing(
    name: str, tmp_path: Path, api_keys: ApiKeys
) -> None:
    service = SERVICES_UNDER_TEST[name]
    running = await service.build(service.settings(tmp_path, api_keys, None))
    stopping: asyncio.Task[None] | None = None
    try:
        await running.set_serving(True)
        async with channel(running, deadline_seconds=30) as open_:
            watch = health_pb2_grpc.HealthStub(open_).Watch(health_pb2.HealthCheckRequest(service=""))
            updates = aiter(watch)
            first = await anext(updates)
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            # A drain period keeps the server up after NOT_SERVING, as a balancer would need.
            stopping = asyncio.create_task(running.stop(drain_seconds=0.5, grace_seconds=0))
            second = await anext(updates)
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await (running.stop() if stopping is None else stopping)
    async with channel(running, deadline_seconds=5) as open_:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await health_pb2_grpc.HealthStub(open_).Check(health_pb2.HealthCheckRequest())
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("name", ALL_SERVICES)
async def test_auth_without_a_key_file_fails_at_build_naming_the_setting(
    name: str, tmp_path: Path, api_keys: ApiKeys
) -> None:
    service = SERVICES_UNDER_TEST[name]
    settings = service.settings(tmp_path, api_keys, "redis://127.0.0.1:1/0", api_keys_file=None)
    with pytest.raises(FailedPrecondition) as raised:
        await _build_and_stop(service, settings)
    assert raised.value.field == "api_keys_file"
    assert "api_keys_file" in str(raised.value)


@pytest.mark.parametrize("name", ALL_SERVICES)
async def test_a_second_server_on_a_taken_port_fails_naming_the_port(
    name: str, tmp_path: Path, api_keys: ApiKeys, request: pytest.FixtureRequest
) -> None:
    service = SERVICES_UNDER_TEST[name]
    async with started(service, tmp_path / "first", api_keys, request) as first:
        redis_url = "redis://127.0.0.1:1/0"
        settings = service.settings(tmp_path / "second", api_keys, redis_url, port=first.port)
        with pytest.raises(Unavailable) as raised:
            await _build_and_stop(service, settings)
        assert raised.value.field == "port"
        assert str(first.port) in str(raised.value)
        # The first server is unaffected.
        assert await health_status(first) == start_status(first)


async def test_config_with_an_unreachable_postgresql_fails_at_build_naming_database_url(
    tmp_path: Path, api_keys: ApiKeys
) -> None:
    service = SERVICES_UNDER_TEST["config"]
    settings = service.settings(
        tmp_path, api_keys, None, database_url="postgresql://liveloop:hunter2@127.0.0.1:1/x"
    )
    with pytest.raises(Unavailable) as raised:
        await _build_and_stop(service, settings)
    assert raised.value.field == "database_url"
    assert "database_url" in str(raised.value)
    assert "127.0.0.1:1" in str(raised.value)
    assert "hunter2" not in str(raised.value)


async def test_a_request_that_does_not_decode_is_invalid_argument_and_counted(
    any_server: tuple[ServiceUnderTest, RunningServer], api_keys: ApiKeys
) -> None:
    """Bytes that are not the method's message: INVALID_ARGUMENT, counted, the server serving on."""
    service, running = any_server
    rpc = next(rpc for rpc in service.rpcs() if not rpc.client_streaming)
    method = rpc.path.lstrip("/").rsplit(".", 1)[-1]  # "PredictorService/Ping", as the metric names it

    def counted() -> float:
        labels = {"service": running.definition.name, "method": method, "code": "INVALID_ARGUMENT"}
        return REGISTRY.get_sample_value("liveloop_rpc_requests_total", labels) or 0.0

    before, health = counted(), await health_status(running, "")
    truncated = b"\x0a\xff"  # field 1, length-delimited, 255 bytes announced, none sent
    async with grpc.aio.insecure_channel(target(running)) as open_:
        codecs = {"request_serializer": _identity, "response_deserializer": _identity}
        metadata = (("x-api-key", api_keys.admin),)
        if rpc.server_streaming:
            call = open_.unary_stream(rpc.path, **codecs)(truncated, metadata=metadata, timeout=10)
            code, details = (await received_then_status(call))[1], ""
        else:
            call = open_.unary_unary(rpc.path, **codecs)(truncated, metadata=metadata, timeout=10)
            code, details = await status_of(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (rpc.path, details)

    async def counted_once() -> bool:  # the server counts a call as it ends, which may follow its status
        return counted() == before + 1

    await eventually(counted_once, what=f"{method} counted once as INVALID_ARGUMENT (before: {before})")
    assert counted() == before + 1
    assert await health_status(running, "") == health  # it answers as before
