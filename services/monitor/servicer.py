"""gRPC face of the monitor service: protobuf <-> domain only; the logic lives in core/."""

from __future__ import annotations

from libs.protos.liveloop.monitor.v1 import monitor_pb2_grpc


class MonitorServicer(monitor_pb2_grpc.MonitorServiceServicer):
    """Its RPCs land with the monitor issue; until then the generated base answers UNIMPLEMENTED."""
