"""Real services in-process on port 0, with auth on, and channels that carry a chosen API key.

Each server fixture builds the service exactly as its `__main__` would (same `build_server`, same
interceptors), on 127.0.0.1:0 with a fresh SQLite file, and stops it after the test.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import ServiceDescriptor
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs.common.client import open_channel
from libs.common.server import RunningServer
from libs.common.settings import ServiceSettings
from libs.protos.inference import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from libs.protos.liveloop.config.v1 import config_pb2, config_pb2_grpc
from libs.protos.liveloop.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from libs.protos.liveloop.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from libs.protos.liveloop.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from libs.stack import topology
from services.config.server import build_server as build_config
from services.config.servicer import ConfigServicer
from services.config.settings import ConfigSettings
from services.ingest.server import build_server as build_ingest
from services.ingest.servicer import IngestServicer
from services.ingest.settings import IngestSettings
from services.monitor.server import build_server as build_monitor
from services.monitor.servicer import MonitorServicer
from services.monitor.settings import MonitorSettings
from services.predictor.inference_servicer import InferenceServicer
from services.predictor.server import build_server as build_predictor
from services.predictor.servicer import PredictorServicer
from services.predictor.settings import PredictorSettings
from services.trainer.server import build_server as build_trainer
from services.trainer.servicer import TrainerServicer
from services.trainer.settings import TrainerSettings
from tests.conftest import ApiKeys
from tests.grpc.probe_service import Probe, probe_settings, serving_probe

PREDICTOR_REPLICA_ID = "predictor-under-test"
UNREACHABLE_TARGET = "127.0.0.1:1"  # nothing listens on port 1: connections are refused at once


def target(running: RunningServer) -> str:
    return f"127.0.0.1:{running.port}"


def channel(
    running: RunningServer, api_key: str | None = None, deadline_seconds: float = 10.0
) -> aio.Channel:
    """A channel built by the project's client (default deadline, retry on UNAVAILABLE, API key)."""
    return open_channel(target(running), api_key=api_key, deadline_seconds=deadline_seconds)


def start_status(running: RunningServer) -> str:
    """The health a service reports right after start (a predictor waits for its first config)."""
    return "SERVING" if running.definition.serving_at_start else "NOT_SERVING"


async def health_status(running: RunningServer, service: str = "") -> str:
    """The health status name of `service` on the server, asked without an API key."""
    async with channel(running) as open_:
        response = await health_pb2_grpc.HealthStub(open_).Check(
            health_pb2.HealthCheckRequest(service=service)
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


@dataclass(frozen=True)
class Rpc:
    path: str  # "/package.Service/Method"
    client_streaming: bool
    server_streaming: bool
    implemented: bool  # False while the servicer still inherits protoc's UNIMPLEMENTED stub


@dataclass(frozen=True)
class ServiceUnderTest:
    """How to build one service for a test, and which servicer answers each of its gRPC services."""

    info: topology.ServiceInfo
    settings_class: type[ServiceSettings]
    build: Callable[[Any], Awaitable[RunningServer]]
    uses_database: bool
    uses_redis: bool
    # (service descriptor, servicer class registered for it, protoc's generated servicer base)
    servicers: tuple[tuple[ServiceDescriptor, type, type], ...]

    @property
    def name(self) -> str:
        return self.info.name

    def rpcs(self) -> list[Rpc]:
        return [
            Rpc(
                path=f"/{descriptor.full_name}/{method.name}",
                client_streaming=method.client_streaming,
                server_streaming=method.server_streaming,
                implemented=getattr(servicer, method.name) is not getattr(base, method.name),
            )
            for descriptor, servicer, base in self.servicers
            for method in descriptor.methods
        ]

    def settings(self, tmp_path: Path, api_keys: ApiKeys, redis_url: str | None, **overrides: Any) -> Any:
        values: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "auth_enabled": True,
            "api_keys_file": api_keys.file,
            "shutdown_drain_seconds": 0,
            "shutdown_grace_seconds": 0,
        }
        if self.uses_database:
            values["database_url"] = f"sqlite:///{tmp_path / f'{self.name}.db'}"
        if self.uses_redis and redis_url is not None:
            values["redis_url"] = redis_url
        if "config_target" in self.settings_class.model_fields:
            # Never a config service on this machine's default port: each test says what it needs.
            values["config_target"] = UNREACHABLE_TARGET
        if self.settings_class is PredictorSettings:
            values["replica_id"] = PREDICTOR_REPLICA_ID
            values["state_dir"] = tmp_path / "predictor-state"
        if self.settings_class is TrainerSettings:
            values["artifact_dir"] = tmp_path / "artifacts"
        if "monitor_target" in self.settings_class.model_fields:
            values["monitor_target"] = UNREACHABLE_TARGET
        if self.settings_class is MonitorSettings:
            # Its own consumer group, reading only what is logged after it starts: the session's
            # Redis holds every other test's decisions too.
            values["archive_dir"] = tmp_path / "decisions"
            values["replica_id"] = "monitor-under-test"
            values["consumer_group"] = f"monitor-test-{uuid.uuid4().hex[:8]}"
            values["consumer_start"] = "newest"
            values["trainer_target"] = UNREACHABLE_TARGET
            values["offline_store_url"] = f"sqlite:///{tmp_path / 'offline-store.db'}"
            values["artifact_dir"] = tmp_path / "artifacts"
        values.update(overrides)
        return self.settings_class(**values)


def _service(module: Any, name: str) -> ServiceDescriptor:
    return module.DESCRIPTOR.services_by_name[name]  # type: ignore[no-any-return]


SERVICES_UNDER_TEST: dict[str, ServiceUnderTest] = {
    "config": ServiceUnderTest(
        topology.CONFIG,
        ConfigSettings,
        build_config,
        uses_database=True,
        uses_redis=False,
        servicers=(
            (_service(config_pb2, "ConfigService"), ConfigServicer, config_pb2_grpc.ConfigServiceServicer),
        ),
    ),
    "predictor": ServiceUnderTest(
        topology.PREDICTOR,
        PredictorSettings,
        build_predictor,
        uses_database=False,
        uses_redis=True,
        servicers=(
            (
                _service(predictor_pb2, "PredictorService"),
                PredictorServicer,
                predictor_pb2_grpc.PredictorServiceServicer,
            ),
            (
                _service(grpc_predict_v2_pb2, "GRPCInferenceService"),
                InferenceServicer,
                grpc_predict_v2_pb2_grpc.GRPCInferenceServiceServicer,
            ),
        ),
    ),
    "ingest": ServiceUnderTest(
        topology.INGEST,
        IngestSettings,
        build_ingest,
        uses_database=True,
        uses_redis=True,
        servicers=(
            (_service(ingest_pb2, "IngestService"), IngestServicer, ingest_pb2_grpc.IngestServiceServicer),
        ),
    ),
    "trainer": ServiceUnderTest(
        topology.TRAINER,
        TrainerSettings,
        build_trainer,
        uses_database=True,
        uses_redis=False,
        servicers=(
            (
                _service(trainer_pb2, "TrainerService"),
                TrainerServicer,
                trainer_pb2_grpc.TrainerServiceServicer,
            ),
        ),
    ),
    "monitor": ServiceUnderTest(
        topology.MONITOR,
        MonitorSettings,
        build_monitor,
        uses_database=True,
        uses_redis=True,
        servicers=(
            (
                _service(monitor_pb2, "MonitorService"),
                MonitorServicer,
                monitor_pb2_grpc.MonitorServiceServicer,
            ),
        ),
    ),
}
assert set(SERVICES_UNDER_TEST) == {service.name for service in topology.SERVICES}


@contextlib.asynccontextmanager
async def started(
    service: ServiceUnderTest, tmp_path: Path, api_keys: ApiKeys, request: pytest.FixtureRequest
) -> AsyncIterator[RunningServer]:
    """The service built and listening on a free port; stopped on exit."""
    redis_url = str(request.getfixturevalue("redis_url")) if service.uses_redis else None
    running = await service.build(service.settings(tmp_path, api_keys, redis_url))
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def config_server(
    tmp_path: Path, api_keys: ApiKeys, request: pytest.FixtureRequest
) -> AsyncIterator[RunningServer]:
    async with started(SERVICES_UNDER_TEST["config"], tmp_path, api_keys, request) as running:
        yield running


@pytest.fixture
async def predictor_server(
    tmp_path: Path, api_keys: ApiKeys, request: pytest.FixtureRequest
) -> AsyncIterator[RunningServer]:
    async with started(SERVICES_UNDER_TEST["predictor"], tmp_path, api_keys, request) as running:
        yield running


@pytest.fixture
async def ingest_server(
    tmp_path: Path, api_keys: ApiKeys, request: pytest.FixtureRequest
) -> AsyncIterator[RunningServer]:
    async with started(SERVICES_UNDER_TEST["ingest"], tmp_path, api_keys, request) as running:
        yield running


@pytest.fixture
async def trainer_server(
    tmp_path: Path, api_keys: ApiKeys, request: pytest.FixtureRequest
) -> AsyncIterator[RunningServer]:
    async with started(SERVICES_UNDER_TEST["trainer"], tmp_path, api_keys, request) as running:
        yield running


@pytest.fixture
async def monitor_server(
    tmp_path: Path, api_keys: ApiKeys, request: pytest.FixtureRequest
) -> AsyncIterator[RunningServer]:
    async with started(SERVICES_UNDER_TEST["monitor"], tmp_path, api_keys, request) as running:
        yield running


@pytest.fixture(params=sorted(SERVICES_UNDER_TEST))
async def any_server(
    request: pytest.FixtureRequest, tmp_path: Path, api_keys: ApiKeys
) -> AsyncIterator[tuple[ServiceUnderTest, RunningServer]]:
    """Each of the five services in turn, with its test description."""
    service = SERVICES_UNDER_TEST[str(request.param)]
    async with started(service, tmp_path, api_keys, request) as running:
        yield service, running


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def probe_server(probe: Probe, api_keys: ApiKeys) -> AsyncIterator[RunningServer]:
    """The test-only probe service behind the shared bootstrap, with auth on."""
    async with serving_probe(probe, probe_settings(api_keys.file)) as running:
        yield running
