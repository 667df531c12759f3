"""gRPC face of the ingest service: protobuf <-> domain only; the logic lives in core/."""

from __future__ import annotations

from libs.protos.liveloop.ingest.v1 import ingest_pb2_grpc


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    """Its RPCs land with the ingest issue; until then the generated base answers UNIMPLEMENTED."""
