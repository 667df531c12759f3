"""Builds a predictor replica's server: PredictorService and the Open Inference Protocol."""

from __future__ import annotations

from grpc import aio

from libs.common.auth import Role
from libs.common.server import RunningServer, ServiceDefinition, start_server
from libs.protos.inference import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from libs.stack.topology import PREDICTOR
from services.predictor.core.replica import ReplicaState
from services.predictor.inference_servicer import InferenceServicer
from services.predictor.servicer import PredictorServicer
from services.predictor.settings import PredictorSettings

PREDICTOR_SERVICE = "/liveloop.predictor.v1.PredictorService/"
INFERENCE_SERVICE = "/inference.GRPCInferenceService/"

# Everything an application calls needs only the `invoke` role; nothing here changes config.
METHOD_ROLES = {
    **{PREDICTOR_SERVICE + method: Role.INVOKE for method in ("Ping", "Invoke", "Respond", "Refresh")},
    **{
        INFERENCE_SERVICE + method: Role.INVOKE
        for method in (
            "ServerLive",
            "ServerReady",
            "ModelReady",
            "ServerMetadata",
            "ModelMetadata",
            "ModelInfer",
        )
    },
}


async def build_server(settings: PredictorSettings) -> RunningServer:
    replica = ReplicaState(replica_id=settings.replica_id)
    predictor = PredictorServicer(replica)
    inference = InferenceServicer(replica)

    def register(server: aio.Server) -> None:
        predictor_pb2_grpc.add_PredictorServiceServicer_to_server(predictor, server)
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)

    definition = ServiceDefinition(
        name=PREDICTOR.name,
        service_names=PREDICTOR.grpc_services,
        register=register,
        method_roles=METHOD_ROLES,
        descriptors=(predictor_pb2.DESCRIPTOR, grpc_predict_v2_pb2.DESCRIPTOR),
    )
    return await start_server(definition, settings)
