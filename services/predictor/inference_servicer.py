"""Open Inference Protocol (KServe v2 / Triton) on a predictor replica.

Models arrive with the trainer; until a config revision binds one, every model name is NOT_FOUND,
which is what OIP clients expect for a model the server does not hold.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from libs.common.errors import NotFound
from libs.protos.inference import grpc_predict_v2_pb2 as oip
from libs.protos.inference import grpc_predict_v2_pb2_grpc
from services.predictor.core.replica import ReplicaState

try:
    SERVER_VERSION = version("liveloop")
except PackageNotFoundError:  # running from a source tree without install
    SERVER_VERSION = "0.0.0"


class InferenceServicer(grpc_predict_v2_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, replica: ReplicaState) -> None:
        self._replica = replica

    async def ServerLive(self, request: oip.ServerLiveRequest, context: Any) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request: oip.ServerReadyRequest, context: Any) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: Any
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name="liveloop", version=SERVER_VERSION, extensions=[])

    async def ModelReady(self, request: oip.ModelReadyRequest, context: Any) -> oip.ModelReadyResponse:
        raise NotFound(
            f"model '{request.name}' is not loaded on replica {self._replica.replica_id}", field="name"
        )

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: Any
    ) -> oip.ModelMetadataResponse:
        raise NotFound(
            f"model '{request.name}' is not loaded on replica {self._replica.replica_id}", field="name"
        )

    async def ModelInfer(self, request: oip.ModelInferRequest, context: Any) -> oip.ModelInferResponse:
        raise NotFound(
            f"model '{request.model_name}' is not loaded on replica {self._replica.replica_id}",
            field="model_name",
        )
