"""gRPC face of the trainer service: protobuf <-> domain only; the logic lives in core/."""

from __future__ import annotations

from libs.protos.liveloop.trainer.v1 import trainer_pb2_grpc


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """Its RPCs land with the trainer issue; until then the generated base answers UNIMPLEMENTED."""
