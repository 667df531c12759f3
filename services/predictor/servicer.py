"""gRPC face of a predictor replica: protobuf <-> domain only; the logic lives in core/."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from libs.common.config_follower import ConfigFollower
from libs.common.errors import Unavailable
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from services.predictor.core.replica import ReplicaState


class PredictorServicer(predictor_pb2_grpc.PredictorServiceServicer):
    """Invoke and Respond land with the decision loop; until then they are UNIMPLEMENTED."""

    def __init__(self, replica: ReplicaState, follower: ConfigFollower) -> None:
        self._replica = replica
        self._follower = follower

    async def Ping(self, request: predictor_pb2.PingRequest, context: Any) -> predictor_pb2.PingResponse:
        server_time = Timestamp()
        server_time.GetCurrentTime()
        return predictor_pb2.PingResponse(
            replica_id=self._replica.replica_id,
            config_revision=self._replica.config_revision,
            server_time=server_time,
        )

    async def Refresh(
        self, request: predictor_pb2.RefreshRequest, context: Any
    ) -> predictor_pb2.RefreshResponse:
        try:
            revision = await self._follower.refresh()
        except (ConnectionError, TimeoutError) as exc:
            raise Unavailable(f"cannot resynchronise with the config service: {exc}") from None
        return predictor_pb2.RefreshResponse(config_revision=revision, replica_id=self._replica.replica_id)
