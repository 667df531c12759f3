"""Typed clients: one place that builds channels with deadlines, retries and API keys.

Every outbound call gets a default deadline, and only UNAVAILABLE is retried (bounded, with
backoff), through gRPC's own retry policy in the channel's service config.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from grpc import aio

from libs.common.server import MAX_MESSAGE_BYTES
from libs.common.tls import ChannelTls

StubT = TypeVar("StubT")


RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.05s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def service_config() -> str:
    """Retry UNAVAILABLE only, with backoff. (Deadlines are set per call by the interceptors:
    grpcio applies a service-config timeout from a clock that runs 1-2 s behind, grpc/grpc#34547.)"""
    return json.dumps({"methodConfig": [{"name": [{}], "retryPolicy": RETRY_POLICY}]})


class _CallPolicy:
    """Adds the API key and, where the caller set none, the default deadline."""

    def __init__(self, api_key: str | None, deadline_seconds: float | None) -> None:
        self._api_key = api_key
        self._deadline_seconds = deadline_seconds

    def details(self, details: Any) -> aio.ClientCallDetails:
        metadata = aio.Metadata(*(details.metadata or ()))
        if self._api_key:
            metadata.add("x-api-key", self._api_key)
        timeout = details.timeout if details.timeout is not None else self._deadline_seconds
        return aio.ClientCallDetails(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready
        )

    def blocking_details(self, details: Any) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ())]
        if self._api_key:
            metadata.append(("x-api-key", self._api_key))
        timeout = details.timeout if details.timeout is not None else self._deadline_seconds
        return _CallDetails(
            details.method,
            timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )


# grpc.aio files each interceptor under the first call kind it matches, so one class per kind.
class _UnaryUnaryPolicy(aio.UnaryUnaryClientInterceptor):
    def __init__(self, policy: _CallPolicy) -> None:
        self._policy = policy

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(self._policy.details(details), request)


class _UnaryStreamPolicy(aio.UnaryStreamClientInterceptor):
    def __init__(self, policy: _CallPolicy) -> None:
        self._policy = policy

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(self._policy.details(details), request)


class _StreamUnaryPolicy(aio.StreamUnaryClientInterceptor):
    def __init__(self, policy: _CallPolicy) -> None:
        self._policy = policy

    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return await continuation(self._policy.details(details), requests)


class _StreamStreamPolicy(aio.StreamStreamClientInterceptor):
    def __init__(self, policy: _CallPolicy) -> None:
        self._policy = policy

    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return await continuation(self._policy.details(details), requests)


class _BlockingPolicy(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, policy: _CallPolicy) -> None:
        self._policy = policy

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._policy.blocking_details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._policy.blocking_details(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._policy.blocking_details(details), requests)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._policy.blocking_details(details), requests)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(
        self,
        method: str,
        timeout: float | None,
        metadata: Any,
        credentials: Any,
        wait_for_ready: Any,
        compression: Any,
    ) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.service_config", service_config()),
    ("grpc.enable_retries", 1),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20000),
    # Reconnect within seconds after an outage (gRPC's default backoff grows towards two minutes).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def open_channel(
    target: str,
    *,
    api_key: str | None = None,
    deadline_seconds: float | None = 10.0,
    tls: ChannelTls | None = None,
) -> aio.Channel:
    """An asyncio channel: a default deadline per call (None for channels carrying long streams),
    bounded retries on UNAVAILABLE only, the API key on every call, and TLS when `tls` is given."""
    policy = _CallPolicy(api_key, deadline_seconds)
    interceptors: list[aio.ClientInterceptor] = [
        _UnaryUnaryPolicy(policy),
        _UnaryStreamPolicy(policy),
        _StreamUnaryPolicy(policy),
        _StreamStreamPolicy(policy),
    ]
    if tls is not None:
        return aio.secure_channel(
            target, tls.credentials(), options=CHANNEL_OPTIONS, interceptors=interceptors
        )
    return aio.insecure_channel(target, options=CHANNEL_OPTIONS, interceptors=interceptors)


def open_blocking_channel(
    target: str,
    *,
    api_key: str | None = None,
    deadline_seconds: float | None = 10.0,
    tls: ChannelTls | None = None,
) -> grpc.Channel:
    """A synchronous channel for the CLI and scripts, with the same policy."""
    if tls is not None:
        channel = grpc.secure_channel(target, tls.credentials(), options=CHANNEL_OPTIONS)
    else:
        channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    return grpc.intercept_channel(channel, _BlockingPolicy(_CallPolicy(api_key, deadline_seconds)))
