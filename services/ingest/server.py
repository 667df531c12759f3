"""Builds the ingest service's server over the offline store (SQL) and the online store (Redis)."""

from __future__ import annotations

import asyncio
import json

import grpc
from grpc import aio

from libs.common.client import open_channel
from libs.common.deployment_spec import DeploymentSpec, deployment_spec_from_mapping
from libs.common.errors import NotFound, Unavailable
from libs.common.redis_connection import open_blocking_redis
from libs.common.server import RunningServer, ServiceDefinition, start_server
from libs.common.service_database import open_service_database
from libs.protos.liveloop.common.v1 import common_pb2
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc
from libs.protos.liveloop.ingest.v1 import ingest_pb2_grpc
from libs.stack.topology import INGEST
from services.ingest.core.catalog import MIGRATIONS_PACKAGE
from services.ingest.core.ingest_service import IngestService
from services.ingest.servicer import IngestServicer
from services.ingest.settings import IngestSettings


async def build_server(settings: IngestSettings) -> RunningServer:
    engine = await open_service_database(
        settings.database_url, service=INGEST.name, migrations_package=MIGRATIONS_PACKAGE
    )
    redis = open_blocking_redis(settings.redis_url, socket_timeout=30, connect_timeout=5)
    config_channel = open_channel(
        settings.config_target,
        api_key=settings.config_api_key,
        deadline_seconds=10,
        tls=settings.outgoing_tls(),
    )
    config = config_pb2_grpc.ConfigServiceStub(config_channel)

    async def fetch_spec(deployment: str, revision: int) -> tuple[DeploymentSpec, int]:
        try:
            reply = await config.Get(
                config_pb2.GetRequest(deployment=common_pb2.DeploymentRef(name=deployment, revision=revision))
            )
        except aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(exc.details() or "", field="deployment") from None
            raise Unavailable(
                f"the config service at {settings.config_target} answered {exc.code().name}"
            ) from None
        return deployment_spec_from_mapping(json.loads(reply.deployment.spec_json)), reply.deployment.revision

    service = IngestService(
        engine,
        redis,
        chunk_rows=settings.chunk_rows,
        upload_dir=settings.upload_dir,
        data_dir=settings.data_dir,
        online_ttl_seconds=settings.online_ttl_seconds,
        fetch_spec=fetch_spec,
    )
    servicer = IngestServicer(service)

    def register(server: aio.Server) -> None:
        ingest_pb2_grpc.add_IngestServiceServicer_to_server(servicer, server)

    async def dispose() -> None:
        await config_channel.close()
        await asyncio.to_thread(redis.close)
        await asyncio.to_thread(engine.dispose)

    definition = ServiceDefinition(
        name=INGEST.name, service_names=INGEST.grpc_services, register=register, on_stop=[dispose]
    )
    try:
        return await start_server(definition, settings)
    except BaseException:
        await dispose()
        raise
