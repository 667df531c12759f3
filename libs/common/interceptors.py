"""The server interceptors every liveloop service installs, outermost first:

1. `TelemetryInterceptor`: request count, latency and status per method (Prometheus) and a span per RPC.
2. `AuthInterceptor`: API key and role per method; health and reflection stay open.
3. `ErrorInterceptor`: the one place where domain errors become status codes; anything unexpected
   becomes INTERNAL with a generic message and is logged with its traceback.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio
from opentelemetry import propagate, trace
from prometheus_client import Counter, Gauge, Histogram
from redis import exceptions as redis_errors
from sqlalchemy import exc as sqlalchemy_errors

from libs.common.auth import CALLER, ApiKeyStore, KeyFile, Role
from libs.common.errors import LiveloopError

logger = logging.getLogger(__name__)

MAX_STATUS_MESSAGE_CHARS = 1000
OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    # GET /health through the front door, for balancers and probes that send no key: it says
    # whether the replica serves and at which revision, nothing about what it serves.
    "/liveloop.predictor.v1.PredictorService/Health",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)

RPC_REQUESTS = Counter(
    "liveloop_rpc_requests_total", "RPCs handled, by method and status code", ["service", "method", "code"]
)
RPC_LATENCY = Histogram(
    "liveloop_rpc_latency_seconds",
    "RPC handling time in seconds",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
RPC_IN_FLIGHT = Gauge("liveloop_rpc_in_flight", "RPCs being handled now", ["service"])

Behavior = Callable[..., Any]
Around = Callable[[Behavior, bool], Behavior]


# grpc's handlers are namedtuples at run time; `_replace` swaps the behavior and keeps the codecs.
Handler = Any
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]


class _WrappedHandlers:
    """Each handler wrapped once (per whatever else the wrapping depends on), not once per call:
    grpc hands an interceptor the same handler object for every call of a method, and the inner
    interceptors hand on the same wrapped one (the auth interceptor one per caller and per kind of
    refusal). Holding the handler keeps its id from being reused while it is cached."""

    MAX_ENTRIES = 10_000  # methods x callers; beyond it (something unforeseen) start again

    def __init__(self) -> None:
        self._cache: dict[tuple[Hashable, int], tuple[Handler, Handler]] = {}

    def get(self, key: Hashable, handler: Handler, wrap: Callable[[Handler], Handler]) -> Handler:
        cached = self._cache.get((key, id(handler)))
        if cached is not None and cached[0] is handler:
            return cached[1]
        if len(self._cache) >= self.MAX_ENTRIES:
            self._cache.clear()
        wrapped = wrap(handler)
        self._cache[(key, id(handler))] = (handler, wrapped)
        return wrapped


def _wrap_handler(handler: Handler, around: Around) -> Handler:
    """Apply `around(behavior, streams_response)` to whichever behavior the handler has."""
    if handler.unary_unary is not None:
        return handler._replace(unary_unary=around(handler.unary_unary, False))
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=around(handler.unary_stream, True))
    if handler.stream_unary is not None:
        return handler._replace(stream_unary=around(handler.stream_unary, False))
    return handler._replace(stream_stream=around(handler.stream_stream, True))


Enter = Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[None]]


def _streaming(
    behavior: Behavior, guard: Callable[[Any], Awaitable[None]], enter: Enter | None = None
) -> Behavior:
    """Wrap a behavior (coroutine, or async generator streaming its responses): `enter(request,
    context)` first when given (it may abort the call), and every exception to `guard`."""
    if inspect.isasyncgenfunction(behavior):

        async def generator(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            try:
                if enter is not None:
                    await enter(request, context)
                async for response in behavior(request, context):
                    yield response
            except BaseException as exc:
                await guard((exc, context))

        return generator

    async def coroutine(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        try:
            if enter is not None:
                await enter(request, context)
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result
        except BaseException as exc:
            await guard((exc, context))

    return coroutine


class _RateLimitedWarning:
    """At most one warning every `every_seconds`, saying how many were held back: a backing store
    that is away fails every request, and a line per request floods the log."""

    def __init__(self, every_seconds: float) -> None:
        self._every = every_seconds
        self._last = -math.inf
        self._held = 0

    def warn(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last < self._every:
            self._held += 1
            return
        held, self._held, self._last = self._held, 0, now
        suffix = f" ({held} more like it in the last {self._every:.0f} s not logged)" if held else ""
        logger.warning(message + suffix, *args)


_STORE_WARNINGS = _RateLimitedWarning(every_seconds=10.0)


def bounded_message(message: str) -> str:
    """A status message never longer than MAX_STATUS_MESSAGE_CHARS: a message may quote what the
    client sent, and an unbounded one overflows the proxy's header limit, which resets the whole
    HTTP/2 connection, every other client's calls on it included."""
    if len(message) <= MAX_STATUS_MESSAGE_CHARS:
        return message
    return message[: MAX_STATUS_MESSAGE_CHARS - 40] + f"... ({len(message)} characters, cut)"


def _around(
    behavior: Behavior,
    enter: Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[None]],
    leave: Callable[[], None] | None = None,
) -> Behavior:
    """`behavior` with `enter(request, context)` awaited before it (it may abort the call) and,
    once enter returned, `leave()` after it however it ends; for coroutines and async generators."""
    if inspect.isasyncgenfunction(behavior):

        async def generator(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await enter(request, context)
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                if leave is not None:
                    leave()

        return generator

    async def coroutine(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await enter(request, context)
        try:
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result
        finally:
            if leave is not None:
                leave()

    return coroutine


async def _map_error(error_and_context: Any) -> None:
    exc, context = error_and_context
    if isinstance(exc, LiveloopError):
        await context.abort(grpc.StatusCode[exc.status], bounded_message(exc.message))
    if isinstance(exc, redis_errors.OutOfMemoryError):
        # Redis reached its memory bound with nothing left it may evict (see redis_argv).
        _STORE_WARNINGS.warn("Redis is out of memory: %s", exc)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "Redis is out of memory; retry later")
    if isinstance(
        exc, redis_errors.ConnectionError | redis_errors.TimeoutError | sqlalchemy_errors.OperationalError
    ):
        # A backing store is away or saturated: the caller may retry, another replica may serve.
        _STORE_WARNINGS.warn("backing store unavailable: %s", exc)
        await context.abort(
            grpc.StatusCode.UNAVAILABLE, "a backing store (Redis or SQL) is unavailable; retry"
        )
    if isinstance(exc, NotImplementedError):
        # Generated servicer bases raise this for RPCs whose capability has not landed yet.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this RPC is not implemented in this release")
    if isinstance(exc, (aio.BaseError, asyncio.CancelledError, GeneratorExit, KeyboardInterrupt, SystemExit)):
        raise exc
    reference = uuid.uuid4().hex[:12]
    logger.error("unhandled error in RPC (ref %s)", reference, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {reference})")


class ErrorInterceptor(aio.ServerInterceptor):
    """Maps `LiveloopError` to its status; unknown errors to INTERNAL with a generic message."""

    def __init__(self) -> None:
        self._wrapped = _WrappedHandlers()

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        return self._wrapped.get(method, handler, lambda raw: _guarded(raw, method))


def _guarded(handler: Handler, method: str) -> Handler:
    enter: Enter | None = None
    if handler.unary_unary is not None or handler.unary_stream is not None:
        handler, enter = _refusing_undecodable(handler, method)
    return _wrap_handler(handler, lambda behavior, _streams: _streaming(behavior, _map_error, enter))


@dataclass(frozen=True)
class _Undecodable:
    """A request whose bytes are not the method's message, in place of the message."""

    reason: str


def _refusing_undecodable(handler: Handler, method: str) -> tuple[Handler, Enter]:
    """A request that does not decode answers INVALID_ARGUMENT (counted like any other call, logged
    in one line), not grpc's UNKNOWN with an exception name and a traceback per request: the
    handler with a deserializer that hands such a request on as `_Undecodable`, and the check that
    refuses it before the servicer runs."""
    deserialize = handler.request_deserializer

    def tolerant(data: bytes) -> Any:
        try:
            return deserialize(data) if deserialize is not None else data
        except Exception as exc:  # protobuf's DecodeError, or any deserializer's own
            return _Undecodable(str(exc) or type(exc).__name__)

    async def refuse_undecodable(request: Any, context: aio.ServicerContext[Any, Any]) -> None:
        if isinstance(request, _Undecodable):
            logger.info("%s: undecodable request refused (%s)", method, request.reason)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid message of {method}")

    return handler._replace(request_deserializer=tolerant), refuse_undecodable


def _metadata_value(details: grpc.HandlerCallDetails, name: str) -> str | None:
    for key, value in details.invocation_metadata or ():
        if key == name:
            return value if isinstance(value, str) else value.decode()
    return None


def api_key_from_metadata(details: grpc.HandlerCallDetails) -> str | None:
    key = _metadata_value(details, "x-api-key")
    if key:
        return key
    authorization = _metadata_value(details, "authorization")
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def _refusal(handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
    async def refuse(_request: Any, context: aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, message)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)


def _as_caller(behavior: Behavior, caller: str) -> Behavior:
    """Run the handler with CALLER set, so audit trails can name who acted."""
    if inspect.isasyncgenfunction(behavior):

        async def generator(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            CALLER.set(caller)
            async for response in behavior(request, context):
                yield response

        return generator

    async def coroutine(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        CALLER.set(caller)
        result = behavior(request, context)
        return await result if inspect.isawaitable(result) else result

    return coroutine


class AuthInterceptor(aio.ServerInterceptor):
    """Checks the API key and its role; methods not in `method_roles` need `admin`."""

    def __init__(self, key_store: ApiKeyStore | KeyFile, method_roles: Mapping[str, Role]) -> None:
        self._key_store = key_store
        self._method_roles = dict(method_roles)
        self._wrapped = _WrappedHandlers()

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        required = self._method_roles.get(method, Role.ADMIN)
        try:
            record = self._key_store.authorize(api_key_from_metadata(handler_call_details), required, method)
        except LiveloopError as exc:
            status, message = grpc.StatusCode[exc.status], exc.message
            return self._wrapped.get(
                (method, status, message), handler, lambda raw: _refusal(raw, status, message)
            )
        caller = record.name or record.key_id
        return self._wrapped.get(
            (method, caller),
            handler,
            lambda raw: _wrap_handler(raw, lambda behavior, _streams: _as_caller(behavior, caller)),
        )


class LoadShedInterceptor(aio.ServerInterceptor):
    """At most `limit` calls run at once; one more is answered RESOURCE_EXHAUSTED at once instead
    of queueing behind them. A call counts from the moment its handler starts, that is once its
    request has arrived whole: grpcio's own `maximum_concurrent_rpcs` also counts streams whose
    message never completes, so a client sending truncated messages would make it shed every
    legitimate call (measured through Envoy: 2,200 stuck streams, 0 of 300 Invokes served)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._running = 0
        self._wrapped = _WrappedHandlers()

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler  # health checks are answered even under load
        return self._wrapped.get(
            handler_call_details.method,
            handler,
            lambda raw: _wrap_handler(
                raw, lambda behavior, _streams: _around(behavior, self._enter, self._leave)
            ),
        )

    async def _enter(self, _request: Any, context: aio.ServicerContext[Any, Any]) -> None:
        if self._running >= self._limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self._limit} calls are running here; retry shortly"
            )
        self._running += 1

    def _leave(self) -> None:
        self._running -= 1


class TelemetryInterceptor(aio.ServerInterceptor):
    """Counts, times and traces every RPC."""

    def __init__(self, service: str, *, tracing: bool) -> None:
        self._service = service
        self._tracer = trace.get_tracer("liveloop") if tracing else None
        self._wrapped = _WrappedHandlers()

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            RPC_REQUESTS.labels(self._service, "unknown", "UNIMPLEMENTED").inc()
            return None
        method = handler_call_details.method.lstrip("/").rsplit(".", 1)[-1]
        if method.startswith(("Health/", "ServerReflection/")):
            return handler
        if self._tracer is None:  # nothing depends on the call: wrapped once per method
            return self._wrapped.get(
                method,
                handler,
                lambda raw: _wrap_handler(raw, lambda behavior, streams: self._observe(behavior, method, {})),
            )
        carrier = {k: v for k, v in handler_call_details.invocation_metadata or () if isinstance(v, str)}
        return _wrap_handler(handler, lambda behavior, streams: self._observe(behavior, method, carrier))

    def _observe(self, behavior: Behavior, method: str, carrier: dict[str, str]) -> Behavior:
        service, tracer = self._service, self._tracer
        latency = RPC_LATENCY.labels(service, method)
        in_flight = RPC_IN_FLIGHT.labels(service)
        counters: dict[str, Any] = {}  # status code name -> its child of RPC_REQUESTS

        def finish(
            context: aio.ServicerContext[Any, Any], started: float, failed: bool, cancelled: bool
        ) -> None:
            code = context.code()
            if code is None:
                name = "UNKNOWN" if failed else "OK"
                if cancelled:
                    name = "CANCELLED"  # the client went away (or its deadline passed) mid-call
            else:
                name = code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode(code).name
            counter = counters.get(name)
            if counter is None:
                counter = counters[name] = RPC_REQUESTS.labels(service, method, name)
            counter.inc()
            latency.observe(time.perf_counter() - started)
            in_flight.dec()

        if inspect.isasyncgenfunction(behavior):

            async def generator(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                started, failed, cancelled = time.perf_counter(), False, False
                in_flight.inc()
                span = _start_span(tracer, method, carrier)
                try:
                    async for response in behavior(request, context):
                        yield response
                except asyncio.CancelledError:
                    failed = cancelled = True
                    raise
                except BaseException:
                    failed = True
                    raise
                finally:
                    if span is not None:
                        span.end()
                    finish(context, started, failed, cancelled)

            return generator

        async def coroutine(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            started, failed, cancelled = time.perf_counter(), False, False
            in_flight.inc()
            span = _start_span(tracer, method, carrier)
            try:
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            except asyncio.CancelledError:
                failed = cancelled = True
                raise
            except BaseException:
                failed = True
                raise
            finally:
                if span is not None:
                    span.end()
                finish(context, started, failed, cancelled)

        return coroutine


def _start_span(tracer: trace.Tracer | None, method: str, carrier: dict[str, str]) -> trace.Span | None:
    if tracer is None:
        return None
    return tracer.start_span(method, context=propagate.extract(carrier), kind=trace.SpanKind.SERVER)
