"""Builds the config service's server over its SQL store."""

from __future__ import annotations

import asyncio

from grpc import aio

from libs.common.auth import Role
from libs.common.server import RunningServer, ServiceDefinition, start_server
from libs.common.service_database import open_service_database
from libs.protos.liveloop.config.v1 import config_pb2_grpc
from libs.stack.topology import CONFIG
from services.config.core.config_service import ConfigService
from services.config.core.store import ConfigStore
from services.config.monitor_client import MonitorServiceClient
from services.config.servicer import ConfigServicer
from services.config.settings import ConfigSettings

# Replicas and other services read config, and replicas report their state, with a `service` key;
# Refresh only resends the head to the replicas (the ecosystem.Ai runtime's /refresh, which its
# clients call with their `invoke` key); everything that changes config, or shows its history and
# replicas, needs `admin`.
CONFIG_SERVICE = "/liveloop.config.v1.ConfigService/"
METHOD_ROLES = {
    **{CONFIG_SERVICE + method: Role.SERVICE for method in ("Watch", "Get", "List")},
    CONFIG_SERVICE + "Refresh": Role.INVOKE,
}


async def build_server(settings: ConfigSettings) -> RunningServer:
    engine = await open_service_database(
        settings.database_url, service=CONFIG.name, migrations_package="services.config.core.migrations"
    )
    monitor = MonitorServiceClient(
        settings.monitor_target,
        settings.monitor_api_key,
        settings.monitor_deadline_seconds,
        settings.outgoing_tls(),
    )
    service = ConfigService(
        ConfigStore(engine),
        heartbeat_seconds=settings.heartbeat_seconds,
        poll_seconds=settings.poll_seconds,
        evaluator=monitor,
    )
    await service.start()
    servicer = ConfigServicer(service)

    def register(server: aio.Server) -> None:
        config_pb2_grpc.add_ConfigServiceServicer_to_server(servicer, server)

    async def dispose() -> None:
        await service.stop()
        await monitor.close()
        await asyncio.to_thread(engine.dispose)

    definition = ServiceDefinition(
        name=CONFIG.name,
        service_names=CONFIG.grpc_services,
        register=register,
        method_roles=METHOD_ROLES,
        on_stop=[dispose],
    )
    try:
        return await start_server(definition, settings)
    except BaseException:
        await dispose()
        raise
