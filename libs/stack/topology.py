"""The services of a liveloop stack: names, gRPC service names, default ports.

The launcher, the Envoy config builder, the CLI and the deploy files all read these, so a port or
a service name is written once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceInfo:
    name: str
    module: str
    grpc_services: tuple[str, ...]
    port: int
    metrics_port: int

    @property
    def health_service(self) -> str:
        return self.grpc_services[0]


CONFIG = ServiceInfo("config", "services.config", ("liveloop.config.v1.ConfigService",), 50051, 9451)
PREDICTOR = ServiceInfo(
    "predictor",
    "services.predictor",
    ("liveloop.predictor.v1.PredictorService", "inference.GRPCInferenceService"),
    50061,
    9461,
)
INGEST = ServiceInfo("ingest", "services.ingest", ("liveloop.ingest.v1.IngestService",), 50071, 9471)
TRAINER = ServiceInfo("trainer", "services.trainer", ("liveloop.trainer.v1.TrainerService",), 50081, 9481)
MONITOR = ServiceInfo("monitor", "services.monitor", ("liveloop.monitor.v1.MonitorService",), 50091, 9491)

SERVICES: tuple[ServiceInfo, ...] = (CONFIG, PREDICTOR, INGEST, TRAINER, MONITOR)
SERVICES_BY_NAME = {service.name: service for service in SERVICES}

ENVOY_PORT = 8080
ENVOY_ADMIN_PORT = 9901
# In containers Envoy's admin listens on 127.0.0.1 only (it can stop Envoy and rewrite its state);
# this port answers the two admin paths others need: /ready (probes) and /stats/prometheus.
ENVOY_PROBE_PORT = 9902
REDIS_PORT = 6380  # never 6379: a system Redis may hold it

# Clients pin a call (health, reflection) to one service through Envoy with this header.
SERVICE_HEADER = "x-liveloop-service"
