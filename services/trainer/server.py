"""Builds the trainer service's server over its SQL store, the offline store and the artifact dir."""

from __future__ import annotations

import asyncio

from grpc import aio

from libs.common.offline_store import open_offline_store
from libs.common.server import RunningServer, ServiceDefinition, start_server
from libs.common.service_database import open_service_database
from libs.protos.liveloop.trainer.v1 import trainer_pb2_grpc
from libs.stack.topology import TRAINER
from services.trainer.config_client import ConfigServiceClient
from services.trainer.core.schema import MIGRATIONS_PACKAGE
from services.trainer.core.store import TrainerStore
from services.trainer.core.trainer_service import TrainerService
from services.trainer.servicer import TrainerServicer
from services.trainer.settings import TrainerSettings


async def build_server(settings: TrainerSettings) -> RunningServer:
    engine = await open_service_database(
        settings.database_url, service=TRAINER.name, migrations_package=MIGRATIONS_PACKAGE
    )
    offline = open_offline_store(settings.offline_store_url)
    config = ConfigServiceClient(
        settings.config_target,
        settings.config_api_key,
        settings.config_deadline_seconds,
        settings.outgoing_tls(),
    )
    service = TrainerService(
        TrainerStore(engine),
        offline,
        offline_store_url=settings.offline_store_url,
        artifact_dir=settings.artifact_dir,
        max_concurrent_jobs=settings.max_concurrent_jobs,
        config=config,
        max_concurrent_evaluations=settings.max_concurrent_evaluations,
        max_evaluation_rows=settings.max_evaluation_rows,
    )
    servicer = TrainerServicer(service)

    def register(server: aio.Server) -> None:
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, server)

    async def dispose() -> None:
        await service.stop()
        await config.close()
        await asyncio.to_thread(offline.dispose)
        await asyncio.to_thread(engine.dispose)

    definition = ServiceDefinition(
        name=TRAINER.name, service_names=TRAINER.grpc_services, register=register, on_stop=[dispose]
    )
    try:
        await service.start()
        return await start_server(definition, settings)
    except BaseException:
        await dispose()
        raise
