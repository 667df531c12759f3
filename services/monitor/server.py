"""Builds the monitor service's server: its SQL store, the decision archive, the decision-log
consumer and the config service client."""

from __future__ import annotations

import asyncio

from grpc import aio

from libs.common.distribution_drift import DriftThresholds
from libs.common.errors import InvalidArgument
from libs.common.offline_store import open_offline_store
from libs.common.redis_connection import open_redis
from libs.common.server import RunningServer, ServiceDefinition, start_server
from libs.common.service_database import open_service_database
from libs.policy.model_repository import ModelRepository
from libs.protos.liveloop.monitor.v1 import monitor_pb2_grpc
from libs.stack.topology import MONITOR
from services.monitor.config_client import ConfigServiceClient
from services.monitor.core.alert_drift import MonitorDriftSource
from services.monitor.core.alert_engine import AlertEngine
from services.monitor.core.alert_rules import load_rules
from services.monitor.core.decision_archive import DecisionArchive
from services.monitor.core.decision_consumer import ConsumerOptions, DecisionLogConsumer
from services.monitor.core.monitor_service import MonitorService
from services.monitor.core.rollup_store import RollupStore
from services.monitor.core.schema import MIGRATIONS_PACKAGE
from services.monitor.servicer import MonitorServicer
from services.monitor.settings import MonitorSettings
from services.monitor.trainer_client import TrainerServiceClient


async def build_server(settings: MonitorSettings) -> RunningServer:
    try:
        thresholds = DriftThresholds(
            psi_warning=settings.drift_psi_warning,
            psi_critical=settings.drift_psi_critical,
            ks_warning=settings.drift_ks_warning,
            ks_critical=settings.drift_ks_critical,
        )
    except ValueError as exc:
        raise InvalidArgument(str(exc), field="drift_psi_warning") from None
    rules = load_rules(settings.alert_rules_file)  # a bad rules file stops the start, naming its line
    engine = await open_service_database(
        settings.database_url, service=MONITOR.name, migrations_package=MIGRATIONS_PACKAGE
    )
    redis = open_redis(settings.redis_url, socket_timeout=10, connect_timeout=5)
    config = ConfigServiceClient(
        settings.config_target,
        settings.config_api_key,
        settings.config_deadline_seconds,
        settings.outgoing_tls(),
    )
    trainer = TrainerServiceClient(
        settings.trainer_target,
        settings.trainer_api_key,
        settings.config_deadline_seconds,
        settings.outgoing_tls(),
    )
    store = RollupStore(engine)
    archive = DecisionArchive(settings.archive_dir, settings.archive_retention_hours)
    consumer = DecisionLogConsumer(
        redis,
        store,
        archive,
        ConsumerOptions(
            group=settings.consumer_group,
            start_at_newest=settings.consumer_start == "newest",
            consumer=settings.replica_id,
            batch_size=settings.consumer_batch_size,
            batch_interval_seconds=settings.consumer_batch_interval_seconds,
            claim_idle_ms=int(settings.consumer_claim_idle_seconds * 1000),
        ),
    )
    offline_store = open_offline_store(settings.offline_store_url)
    service = MonitorService(
        store,
        archive,
        consumer,
        config,
        trainer,
        thresholds,
        offline_store=offline_store,
        models=ModelRepository(settings.artifact_dir) if settings.artifact_dir is not None else None,
    )
    servicer = MonitorServicer(service)

    def register(server: aio.Server) -> None:
        monitor_pb2_grpc.add_MonitorServiceServicer_to_server(servicer, server)

    async def dispose() -> None:
        await service.stop()
        await config.close()
        await trainer.close()
        await redis.aclose()
        await asyncio.to_thread(engine.dispose)
        await asyncio.to_thread(offline_store.dispose)

    definition = ServiceDefinition(
        name=MONITOR.name, service_names=MONITOR.grpc_services, register=register, on_stop=[dispose]
    )
    try:
        service.alerts = AlertEngine(
            rules,
            store,
            config=config,
            drift=MonitorDriftSource(service),
            decision_log=consumer,
            metrics_urls=settings.alert_metrics_urls,
            external_url=settings.alert_external_url,
            interval_seconds=settings.alert_interval_seconds,
        )
        await service.start()
        return await start_server(definition, settings)
    except BaseException:
        await dispose()
        raise
