"""Prometheus endpoint and OpenTelemetry tracing, set up once per process."""

from __future__ import annotations

import logging

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from prometheus_client import start_http_server

from libs.common.errors import Unavailable
from libs.common.settings import TracingExporter

logger = logging.getLogger(__name__)


def start_metrics_endpoint(host: str, port: int) -> int:
    """Serve /metrics on its own port (0 picks one); return the bound port."""
    try:
        server, _thread = start_http_server(port, addr=host)
    except OSError as exc:
        raise Unavailable(f"cannot bind {host}:{port}: {exc.strerror}", field="metrics_port") from None
    bound = int(server.server_address[1])
    logger.info("metrics on http://%s:%d/metrics", host, bound)
    return bound


def configure_tracing(service: str, exporter: TracingExporter, otlp_endpoint: str) -> bool:
    """Install a tracer provider; return whether tracing is on."""
    if exporter is TracingExporter.NONE:
        return False
    span_exporter: SpanExporter
    if exporter is TracingExporter.CONSOLE:
        span_exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter(endpoint=otlp_endpoint, insecure=otlp_endpoint.startswith("http://"))
    provider = TracerProvider(resource=Resource.create({"service.name": f"liveloop-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    return True
