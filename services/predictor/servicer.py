"""gRPC face of a predictor replica: protobuf <-> domain only; the logic lives in core/."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from services.predictor.core.replica import ReplicaState


class PredictorServicer(predictor_pb2_grpc.PredictorServiceServicer):
    """Invoke, Respond and Refresh land with the decision loop; until then they are UNIMPLEMENTED."""

    def __init__(self, replica: ReplicaState) -> None:
        self._replica = replica

    async def Ping(self, request: predictor_pb2.PingRequest, context: Any) -> predictor_pb2.PingResponse:
        server_time = Timestamp()
        server_time.GetCurrentTime()
        return predictor_pb2.PingResponse(
            replica_id=self._replica.replica_id,
            config_revision=self._replica.config_revision,
            server_time=server_time,
        )
