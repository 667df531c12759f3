"""A test-only gRPC service on raw bytes, served through the shared bootstrap (`start_server`).

It has no proto: handlers take and return bytes (identity codecs), so each test can make a method
fail in exactly the way it needs and see what the shared interceptors turn that into.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from pydantic_settings import SettingsConfigDict

from libs.common.auth import Role
from libs.common.errors import InvalidArgument, NotFound, Unavailable
from libs.common.server import RunningServer, ServiceDefinition, start_server
from libs.common.settings import ServiceSettings

SERVICE = "liveloop.test.v1.Probe"
SECRET = "secret detail"


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


class ProbeSettings(ServiceSettings):
    # Its own prefix, so nothing in the environment leaks into the tests.
    model_config = SettingsConfigDict(env_prefix="LIVELOOP_GRPC_TEST_PROBE_", extra="ignore", frozen=True)


def probe_settings(api_keys_file: Path | None, **overrides: Any) -> ProbeSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "auth_enabled": True,
        "api_keys_file": api_keys_file,
        **overrides,
    }
    return ProbeSettings(**values)


@dataclass
class Probe:
    """The handlers, and what the server saw: attempts per method; an event nobody sets by itself."""

    unavailable_failures: int = 0
    attempts: dict[str, int] = field(default_factory=dict)
    never: asyncio.Event = field(default_factory=asyncio.Event)

    def _saw(self, name: str) -> None:
        self.attempts[name] = self.attempts.get(name, 0) + 1

    # Unary-unary.
    async def ok(self, request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        self._saw("Ok")
        return b"ok:" + request

    async def admin_only(self, request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        self._saw("AdminOnly")
        return b"admin"

    async def invalid_argument(self, request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        self._saw("InvalidArgument")
        raise InvalidArgument("must be positive", field="offer_count")

    async def not_found(self, request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        self._saw("NotFound")
        raise NotFound("offer 'summer-bundle' does not exist")

    async def crash(self, request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        self._saw("Crash")
        raise RuntimeError(SECRET)

    def sync_crash(self, request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        # A plain function, as protoc's servicer bases are.
        self._saw("SyncCrash")
        raise RuntimeError(SECRET)

    async def not_implemented(self, request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        self._saw("NotImplemented")
        raise NotImplementedError(SECRET)

    async def flaky(self, request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        """Unavailable for the first `unavailable_failures` attempts, then OK."""
        self._saw("Flaky")
        if self.attempts["Flaky"] <= self.unavailable_failures:
            raise Unavailable(f"warming up (attempt {self.attempts['Flaky']})")
        return b"ok after " + str(self.attempts["Flaky"]).encode()

    async def hang(self, request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        self._saw("Hang")
        await self.never.wait()
        return b"released"

    async def time_remaining(self, request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        """The seconds left before the call's deadline, as the server sees it ("none" without one)."""
        self._saw("TimeRemaining")
        remaining = context.time_remaining()
        return b"none" if remaining is None else repr(remaining).encode()

    # Unary-stream.
    async def stream_then_crash(
        self, request: bytes, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        self._saw("StreamThenCrash")
        yield b"1"
        yield b"2"
        raise RuntimeError(SECRET)

    async def write_then_crash(self, request: bytes, context: aio.ServicerContext[Any, Any]) -> None:
        self._saw("WriteThenCrash")
        await context.write(b"1")
        raise RuntimeError(SECRET)

    # Stream-unary.
    async def count_non_empty(
        self, requests: AsyncIterator[bytes], context: aio.ServicerContext[Any, Any]
    ) -> bytes:
        self._saw("CountNonEmpty")
        count = 0
        async for request in requests:
            if not request:
                raise InvalidArgument("must not be empty", field="chunk")
            count += 1
        return str(count).encode()

    # Stream-stream.
    async def echo_then_not_found(
        self, requests: AsyncIterator[bytes], context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        self._saw("EchoThenNotFound")
        async for request in requests:
            if request == b"missing":
                raise NotFound("offer 'missing' does not exist")
            yield request

    def handlers(self) -> grpc.GenericRpcHandler:
        unary = grpc.unary_unary_rpc_method_handler
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Ok": unary(self.ok),
                "AdminOnly": unary(self.admin_only),
                "InvalidArgument": unary(self.invalid_argument),
                "NotFound": unary(self.not_found),
                "Crash": unary(self.crash),
                "SyncCrash": unary(self.sync_crash),
                "NotImplemented": unary(self.not_implemented),
                "Flaky": unary(self.flaky),
                "Hang": unary(self.hang),
                "TimeRemaining": unary(self.time_remaining),
                "StreamThenCrash": grpc.unary_stream_rpc_method_handler(self.stream_then_crash),
                "WriteThenCrash": grpc.unary_stream_rpc_method_handler(self.write_then_crash),
                "CountNonEmpty": grpc.stream_unary_rpc_method_handler(self.count_non_empty),
                "EchoThenNotFound": grpc.stream_stream_rpc_method_handler(self.echo_then_not_found),
            },
        )


INVOKE_METHODS = (
    "Ok",
    "InvalidArgument",
    "NotFound",
    "Crash",
    "SyncCrash",
    "NotImplemented",
    "Flaky",
    "Hang",
    "TimeRemaining",
    "StreamThenCrash",
    "WriteThenCrash",
    "CountNonEmpty",
    "EchoThenNotFound",
)  # AdminOnly is left out: methods not listed need `admin`


def probe_definition(probe: Probe, name: str = "grpc-test-probe") -> ServiceDefinition:
    def register(server: aio.Server) -> None:
        server.add_generic_rpc_handlers((probe.handlers(),))

    return ServiceDefinition(
        name=name,
        service_names=(SERVICE,),
        register=register,
        method_roles={method(name): Role.INVOKE for name in INVOKE_METHODS},
    )


@contextlib.asynccontextmanager
async def serving_probe(probe: Probe, settings: ProbeSettings) -> AsyncIterator[RunningServer]:
    running = await start_server(probe_definition(probe), settings)
    try:
        yield running
    finally:
        probe.never.set()  # release any handler still waiting
        await running.stop()


def key_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return () if api_key is None else (("x-api-key", api_key),)


def _identity(message: bytes) -> bytes:
    return message


def unary(channel: aio.Channel, name: str) -> Callable[..., Awaitable[bytes]]:
    return channel.unary_unary(method(name), request_serializer=_identity, response_deserializer=_identity)


def unary_stream(channel: aio.Channel, name: str) -> Callable[..., Any]:
    return channel.unary_stream(method(name), request_serializer=_identity, response_deserializer=_identity)


def stream_unary(channel: aio.Channel, name: str) -> Callable[..., Any]:
    return channel.stream_unary(method(name), request_serializer=_identity, response_deserializer=_identity)


def stream_stream(channel: aio.Channel, name: str) -> Callable[..., Any]:
    return channel.stream_stream(method(name), request_serializer=_identity, response_deserializer=_identity)


async def status_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    """Await a unary-response call: its final status and details."""
    try:
        await call
    except aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


async def received_then_status(call: Any) -> tuple[list[bytes], grpc.StatusCode, str]:
    """Drain a response stream: the messages that arrived, then the final status and details."""
    received: list[bytes] = []
    try:
        async for message in call:
            received.append(message)
    except aio.AioRpcError as error:
        return received, error.code(), error.details() or ""
    return received, grpc.StatusCode.OK, ""


def chunks(*items: bytes) -> Iterable[bytes]:
    return iter(items)
