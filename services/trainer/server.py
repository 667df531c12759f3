"""Builds the trainer service's server over its SQL store."""

from __future__ import annotations

import asyncio

from grpc import aio

from libs.common.server import RunningServer, ServiceDefinition, start_server
from libs.common.service_database import open_service_database
from libs.protos.liveloop.trainer.v1 import trainer_pb2_grpc
from libs.stack.topology import TRAINER
from services.trainer.servicer import TrainerServicer
from services.trainer.settings import TrainerSettings


async def build_server(settings: TrainerSettings) -> RunningServer:
    engine = await open_service_database(settings.database_url, service=TRAINER.name)
    servicer = TrainerServicer()

    def register(server: aio.Server) -> None:
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, server)

    async def dispose() -> None:
        await asyncio.to_thread(engine.dispose)

    definition = ServiceDefinition(
        name=TRAINER.name, service_names=TRAINER.grpc_services, register=register, on_stop=[dispose]
    )
    try:
        return await start_server(definition, settings)
    except BaseException:
        await dispose()
        raise
