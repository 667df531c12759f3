"""Builds the ingest service's server over its SQL store."""

from __future__ import annotations

import asyncio

from grpc import aio

from libs.common.server import RunningServer, ServiceDefinition, start_server
from libs.common.service_database import open_service_database
from libs.protos.liveloop.ingest.v1 import ingest_pb2_grpc
from libs.stack.topology import INGEST
from services.ingest.servicer import IngestServicer
from services.ingest.settings import IngestSettings


async def build_server(settings: IngestSettings) -> RunningServer:
    engine = await open_service_database(settings.database_url, service=INGEST.name)
    servicer = IngestServicer()

    def register(server: aio.Server) -> None:
        ingest_pb2_grpc.add_IngestServiceServicer_to_server(servicer, server)

    async def dispose() -> None:
        await asyncio.to_thread(engine.dispose)

    definition = ServiceDefinition(
        name=INGEST.name, service_names=INGEST.grpc_services, register=register, on_stop=[dispose]
    )
    try:
        return await start_server(definition, settings)
    except BaseException:
        await dispose()
        raise
