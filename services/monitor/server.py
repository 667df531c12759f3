"""Builds the monitor service's server over its SQL store."""

from __future__ import annotations

import asyncio

from grpc import aio

from libs.common.server import RunningServer, ServiceDefinition, start_server
from libs.common.service_database import open_service_database
from libs.protos.liveloop.monitor.v1 import monitor_pb2_grpc
from libs.stack.topology import MONITOR
from services.monitor.servicer import MonitorServicer
from services.monitor.settings import MonitorSettings


async def build_server(settings: MonitorSettings) -> RunningServer:
    engine = await open_service_database(settings.database_url, service=MONITOR.name)
    servicer = MonitorServicer()

    def register(server: aio.Server) -> None:
        monitor_pb2_grpc.add_MonitorServiceServicer_to_server(servicer, server)

    async def dispose() -> None:
        await asyncio.to_thread(engine.dispose)

    definition = ServiceDefinition(
        name=MONITOR.name, service_names=MONITOR.grpc_services, register=register, on_stop=[dispose]
    )
    try:
        return await start_server(definition, settings)
    except BaseException:
        await dispose()
        raise
