"""Tracing: with an exporter configured, every RPC becomes a server span, parented by the caller's."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from libs.common.settings import TracingExporter
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from services.predictor.server import build_server
from services.predictor.settings import PredictorSettings
from tests.conftest import ApiKeys

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_rpc_spans_join_the_callers_trace(api_keys: ApiKeys) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    settings = PredictorSettings(
        port=0, api_keys_file=api_keys.file, tracing_exporter=TracingExporter.CONSOLE, replica_id="traced"
    )
    running = await build_server(settings)
    try:
        tracer = provider.get_tracer("test-client")
        with tracer.start_as_current_span("client-call") as client_span:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                await predictor_pb2_grpc.PredictorServiceStub(channel).Ping(
                    predictor_pb2.PingRequest(),
                    metadata=(("x-api-key", api_keys.invoke), *carrier.items()),
                    timeout=5,
                )
        spans = {span.name: span for span in exporter.get_finished_spans()}
        server_span = spans["PredictorService/Ping"]
        assert server_span.kind is trace.SpanKind.SERVER
        assert server_span.context.trace_id == client_span.get_span_context().trace_id
        assert server_span.parent is not None
        assert server_span.parent.span_id == client_span.get_span_context().span_id
    finally:
        await running.stop()
