"""gRPC face of the config service: protobuf <-> domain only; the logic lives in core/."""

from __future__ import annotations

from libs.protos.liveloop.config.v1 import config_pb2_grpc


class ConfigServicer(config_pb2_grpc.ConfigServiceServicer):
    """Publish, Get, List, History, Rollback, Watch and ReplicaStatus land with the config issue;
    until then the generated base answers UNIMPLEMENTED."""
