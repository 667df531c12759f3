"""The monitor's client of the trainer: the training reference of a model version."""

from __future__ import annotations

import json

import grpc
from grpc import aio

from libs.common.client import open_channel
from libs.common.distribution_drift import TrainingReference
from libs.common.errors import FailedPrecondition, Unavailable
from libs.common.tls import ChannelTls
from libs.protos.liveloop.trainer.v1 import trainer_pb2, trainer_pb2_grpc


class TrainerServiceClient:
    """Implements services.monitor.core.monitor_service.TrainingReferences over gRPC."""

    def __init__(
        self, target: str, api_key: str | None, deadline_seconds: float, tls: ChannelTls | None = None
    ) -> None:
        self._target = target
        self._channel = open_channel(target, api_key=api_key, deadline_seconds=deadline_seconds, tls=tls)
        self._stub = trainer_pb2_grpc.TrainerServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def training_reference(self, name: str, version: int) -> TrainingReference | None:
        """The reference of `name:version` (0: newest); None when there is none."""
        try:
            response = await self._stub.GetTrainingReference(
                trainer_pb2.GetTrainingReferenceRequest(name=name, version=version)
            )
        except aio.AioRpcError as error:
            code = error.code()
            if code == grpc.StatusCode.NOT_FOUND:
                return None
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                raise FailedPrecondition(
                    f"the trainer refused the monitor's key ({code.name})", field="trainer_api_key"
                ) from None
            raise Unavailable(
                f"trainer at {self._target}: {code.name}: {error.details() or ''}", field="trainer_target"
            ) from None
        return TrainingReference.from_json(json.loads(response.reference_json))
