"""Server bootstrap shared by every service: grpc.aio, interceptors, health, reflection, shutdown.

`start_server` binds and starts (tests pass port 0 and read the bound port back); `run_service` is
what a service's `__main__` calls: logging, tracing, metrics, signals, graceful stop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
import uvloop
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from libs.common.auth import KeyFile, Role
from libs.common.errors import FailedPrecondition, LiveloopError, Unavailable
from libs.common.interceptors import (
    AuthInterceptor,
    ErrorInterceptor,
    LoadShedInterceptor,
    TelemetryInterceptor,
)
from libs.common.settings import EventLoop, ServiceSettings, TracingExporter, load_settings
from libs.common.structured_logging import configure_logging
from libs.common.telemetry import configure_tracing, start_metrics_endpoint

logger = logging.getLogger(__name__)

# One message cap for every server and client: large enough for big specs and tensors, small
# enough that a hostile request cannot exhaust memory.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.so_reuseport", 0),  # a taken port must fail loudly, not share traffic
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
]

Cleanup = Callable[[], Awaitable[None]]


@dataclass
class ServiceDefinition:
    """What a service contributes to the shared bootstrap."""

    name: str
    service_names: Sequence[str]
    register: Callable[[aio.Server], None]
    method_roles: Mapping[str, Role] = field(default_factory=dict)
    serving_at_start: bool = True
    on_stop: list[Cleanup] = field(default_factory=list)
    # Proto files of the services, for reflection (some live outside protobuf's default pool).
    descriptors: Sequence[FileDescriptor] = ()


@dataclass
class RunningServer:
    server: aio.Server
    port: int
    definition: ServiceDefinition
    health: health.aio.HealthServicer

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.definition.service_names):
            await self.health.set(name, status)

    async def stop(self, drain_seconds: float = 0.0, grace_seconds: float = 0.0) -> None:
        """NOT_SERVING, give balancers `drain_seconds` to notice, then stop with grace."""
        await self.set_serving(False)
        if drain_seconds > 0:
            await asyncio.sleep(drain_seconds)
        await self.server.stop(grace_seconds)
        for cleanup in reversed(self.definition.on_stop):
            try:
                await cleanup()
            except Exception:
                logger.exception("cleanup failed during stop")


def _reflection_pool(files: Sequence[FileDescriptor]) -> descriptor_pool.DescriptorPool:
    """One pool holding the given files, their imports, health and reflection."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)  # type: ignore[no-untyped-call]
        added.add(file.name)

    for file in (*files, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        add(file)
    return pool


def load_key_store(settings: ServiceSettings) -> KeyFile | None:
    if not settings.auth_enabled:
        logger.warning("API key auth is disabled: every caller is trusted")
        return None
    if settings.api_keys_file is None:
        raise FailedPrecondition(
            "auth is enabled but no key file is set; create one with `liveloop keys create` "
            "or set auth_enabled=false for a trusted network",
            field="api_keys_file",
        )
    return KeyFile(settings.api_keys_file)


def _bind(server: aio.Server, settings: ServiceSettings) -> int:
    address = f"{settings.host}:{settings.port}"
    try:
        if settings.tls_cert_file and settings.tls_key_file:
            client_ca = settings.tls_client_ca_file
            credentials = grpc.ssl_server_credentials(
                [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
                root_certificates=client_ca.read_bytes() if client_ca else None,
                require_client_auth=client_ca is not None,
            )
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise Unavailable(f"cannot bind {address}: {exc} (is the port taken?)", field="port") from None
    if port == 0:
        raise Unavailable(f"cannot bind {address}: the port is taken or the address is wrong", field="port")
    return port


async def start_server(definition: ServiceDefinition, settings: ServiceSettings) -> RunningServer:
    key_store = load_key_store(settings)
    tracing = settings.tracing_exporter is not TracingExporter.NONE
    interceptors: list[aio.ServerInterceptor] = [
        TelemetryInterceptor(definition.name, tracing=tracing),
        # Load beyond what the server can answer in time is shed, not queued without bound.
        LoadShedInterceptor(settings.max_concurrent_rpcs),
    ]
    if key_store is not None:
        interceptors.append(AuthInterceptor(key_store, definition.method_roles))
    interceptors.append(ErrorInterceptor())
    server = aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
    definition.register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [
            *definition.service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
        pool=_reflection_pool(definition.descriptors) if definition.descriptors else None,
    )
    port = _bind(server, settings)
    running = RunningServer(server=server, port=port, definition=definition, health=health_servicer)
    await running.set_serving(definition.serving_at_start)
    await server.start()
    logger.info("%s listening on %s:%d", definition.name, settings.host, port)
    return running


SettingsT = TypeVar("SettingsT", bound=ServiceSettings)


async def _serve(
    settings: SettingsT,
    build: Callable[[SettingsT], Awaitable[RunningServer]],
) -> None:
    running = await build(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    server_done = asyncio.ensure_future(running.server.wait_for_termination())
    stop_requested = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({server_done, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
    logger.info("%s stopping: draining %.1fs", running.definition.name, settings.shutdown_drain_seconds)
    await running.stop(settings.shutdown_drain_seconds, settings.shutdown_grace_seconds)
    server_done.cancel()
    logger.info("%s stopped", running.definition.name)


def _loop_factory(event_loop: EventLoop) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if event_loop is EventLoop.UVLOOP:
        return uvloop.new_event_loop
    return None  # asyncio's own


def run_service(
    service: str,
    settings_class: type[SettingsT],
    build: Callable[[SettingsT], Awaitable[RunningServer]],
) -> None:
    """Entry point body for `python -m services.<name>` and its console script."""
    settings = load_settings(settings_class)
    configure_logging(service, settings.log_format, settings.log_level)
    configure_tracing(service, settings.tracing_exporter, settings.otlp_endpoint)
    try:
        if settings.metrics_port is not None:
            start_metrics_endpoint(settings.host, settings.metrics_port)
        with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
            runner.run(_serve(settings, build))
    except LiveloopError as exc:
        logger.error("%s cannot start: %s", service, exc.message)
        raise SystemExit(1) from None
    except OSError as exc:
        logger.error("%s cannot start: %s", service, exc)
        raise SystemExit(1) from None
