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

StubT = TypeVar("StubT")


def service_config(deadline_seconds: float | None, max_attempts: int = 4) -> str:
    """Retry UNAVAILABLE only; a default deadline unless None (channels that carry long streams)."""
    method_config: dict[str, Any] = {"name": [{}]}
    if deadline_seconds is not None:
        method_config["timeout"] = f"{deadline_seconds:.3f}s"
    return json.dumps(
        {
            "methodConfig": [
                {
                    **method_config,
                    "retryPolicy": {
                        "maxAttempts": max_attempts,
                        "initialBackoff": "0.05s",
                        "maxBackoff": "1s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


class _ApiKeyAuth(grpc.AuthMetadataPlugin):
    def __init__(self, api_key: str) -> None:
        self._metadata = (("x-api-key", api_key),)

    def __call__(self, context: Any, callback: Any) -> None:
        callback(self._metadata, None)


class _ApiKeyInterceptor(
    aio.UnaryUnaryClientInterceptor,
    aio.UnaryStreamClientInterceptor,
    aio.StreamUnaryClientInterceptor,
    aio.StreamStreamClientInterceptor,
):
    """Adds the API key on plaintext channels (call credentials need TLS)."""

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    def _details(self, details: aio.ClientCallDetails) -> aio.ClientCallDetails:
        metadata = aio.Metadata(*(details.metadata or ()))
        metadata.add("x-api-key", self._api_key)
        return aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return await continuation(self._details(details), requests)

    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return await continuation(self._details(details), requests)


def channel_options(deadline_seconds: float | None) -> list[tuple[str, Any]]:
    return [
        ("grpc.service_config", service_config(deadline_seconds)),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 20000),
    ]


def open_channel(
    target: str,
    *,
    api_key: str | None = None,
    deadline_seconds: float | None = 10.0,
    root_certificates: bytes | None = None,
    tls: bool = False,
) -> aio.Channel:
    """An asyncio channel with the default deadline, retry on UNAVAILABLE and the API key."""
    options = channel_options(deadline_seconds)
    if tls or root_certificates is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates)
        if api_key:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.metadata_call_credentials(_ApiKeyAuth(api_key))
            )
        return aio.secure_channel(target, credentials, options=options)
    interceptors = [_ApiKeyInterceptor(api_key)] if api_key else None
    return aio.insecure_channel(target, options=options, interceptors=interceptors)


def open_blocking_channel(
    target: str, *, api_key: str | None = None, deadline_seconds: float = 10.0, tls: bool = False
) -> grpc.Channel:
    """A synchronous channel for the CLI and scripts, with the same policy."""
    options = channel_options(deadline_seconds)
    if tls:
        credentials = grpc.ssl_channel_credentials()
        if api_key:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.metadata_call_credentials(_ApiKeyAuth(api_key))
            )
        return grpc.secure_channel(target, credentials, options=options)
    channel = grpc.insecure_channel(target, options=options)
    if api_key:
        return grpc.intercept_channel(channel, _BlockingApiKeyInterceptor(api_key))
    return channel


class _BlockingApiKeyInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), ("x-api-key", self._api_key)]
        return (
            details._replace(metadata=metadata)
            if hasattr(details, "_replace")
            else _CallDetails(
                details.method,
                details.timeout,
                metadata,
                details.credentials,
                getattr(details, "wait_for_ready", None),
                getattr(details, "compression", None),
            )
        )

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


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
